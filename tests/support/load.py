"""A load generator for tests: client threads loop a scenario against a real server until
stopped, and every call is recorded (when it was sent, how long it took, its status and
body, or the error when no answer came), so a test can say which calls failed and when.

Unlike the benchmarks' throughput generator (bench/load.py: wrk, or keep-alive GETs as fast
as they go), this one sends each call on a new connection, so calls spread over gunicorn's
workers, and it paces each client.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import requests

from tests.support.databases import stored_messages


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile of ``values`` (NaN when there are none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


@dataclass
class Call:
    kind: str
    started: float  # time.monotonic() when sent
    ended: float
    status: int | None = None  # None: no HTTP answer (connection reset, timeout)
    body: dict | None = None
    retry_after: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def __repr__(self) -> str:
        return f"<{self.kind} {self.status or self.error} {self.seconds:.2f}s>"


@dataclass
class Acked:
    """A message the server answered 202 to."""

    message_id: int
    reply_id: int
    content: str
    started: float


@dataclass
class Traffic:
    """Client threads looping a scenario until stopped; every call is recorded."""

    base_url: str
    tokens: list[str]
    scenario: object  # scenario(traffic, worker_index, token, iteration)
    pause: float = 0.02  # between iterations of one client
    conversations: list[int] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    acked: list[Acked] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, kind: str, method: str, path: str, token: str, json=None) -> Call:
        started = time.monotonic()
        record = Call(kind, started, started)
        try:
            # A new connection per call, so calls spread over gunicorn's workers.
            response = requests.request(
                method,
                self.base_url + path,
                json=json,
                timeout=30,
                headers={"Authorization": f"Bearer {token}", "Connection": "close"},
            )
            record.status = response.status_code
            record.retry_after = response.headers.get("Retry-After")
            if response.headers.get("Content-Type", "").startswith("application/json"):
                record.body = response.json()
        except requests.RequestException as exc:
            record.error = type(exc).__name__
        record.ended = time.monotonic()
        with self.lock:
            self.calls.append(record)
        return record

    def start(self) -> Traffic:
        for index, token in enumerate(self.tokens):
            thread = threading.Thread(target=self._loop, args=(index, token), daemon=True)
            self.threads.append(thread)
            thread.start()
        return self

    def _loop(self, index: int, token: str) -> None:
        iteration = 0
        while not self.stopping.is_set():
            self.scenario(self, index, token, iteration)
            iteration += 1
            time.sleep(self.pause)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)
            assert not thread.is_alive(), "a client thread did not finish"


def reads(traffic: Traffic, index: int, token: str, iteration: int) -> None:
    """Reads only: list conversations, read one, list its messages."""
    conversation_id = traffic.conversations[index]
    traffic.call("list", "GET", "/api/v1/conversations", token)
    traffic.call("get", "GET", f"/api/v1/conversations/{conversation_id}", token)
    traffic.call("messages", "GET", f"/api/v1/conversations/{conversation_id}/messages", token)


def chats(traffic: Traffic, index: int, token: str, iteration: int) -> None:
    """Start a conversation, send a message of eight words, list conversations."""
    created = traffic.call("create", "POST", "/api/v1/conversations", token, {"title": "load"})
    if created.status == 201:
        content = f"client {index} message {iteration} alpha beta gamma delta"
        posted = traffic.call(
            "post",
            "POST",
            f"/api/v1/conversations/{created.body['id']}/messages",
            token,
            {"content": content},
        )
        if posted.status == 202:
            with traffic.lock:
                traffic.acked.append(
                    Acked(
                        posted.body["message"]["id"],
                        posted.body["reply"]["id"],
                        content,
                        posted.started,
                    )
                )
    traffic.call("list", "GET", "/api/v1/conversations", token)


def register_clients(base_url: str, count: int) -> list[str]:
    tokens = []
    for index in range(count):
        credentials = {"username": f"load{index}", "password": "correct horse"}
        assert requests.post(f"{base_url}/api/v1/users", json=credentials, timeout=30).status_code == 201
        response = requests.post(f"{base_url}/api/v1/tokens", json=credentials, timeout=30)
        assert response.status_code == 201, response.text
        tokens.append(response.json()["token"])
    return tokens


def wait_until(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def assert_acked_messages_stored(uri: str, acked: list[Acked]) -> dict:
    """Every message the server answered 202 to is stored, with its reply; the rows by id."""
    from chatapp.chat.models import Role

    rows = stored_messages(uri)
    for item in acked:
        message = rows.get(item.message_id)
        assert message is not None, f"acknowledged message {item.message_id} was not stored"
        assert (message.role, message.content) == (Role.USER, item.content)
        assert item.reply_id in rows, f"the reply to message {item.message_id} was not stored"
    return rows
