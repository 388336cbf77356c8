"""The pressure scenario against a running server: many chats post at once and read their
replies' streams while two threads time GET /api/v1/conversations. tests/test_pressure.py
checks its outcomes; bench/pressure.py prints its figures."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.support.load import percentile
from tests.support.sse import read_reply


class Client:
    def __init__(self, base_url: str):
        self.base = base_url + "/api/v1"
        self.http = requests.Session()

    def setup_user(self, username: str, conversations: int) -> list[int]:
        self.http.post(f"{self.base}/users", json={"username": username, "password": "pressure-pass"}, timeout=30)
        token = self.http.post(
            f"{self.base}/tokens", json={"username": username, "password": "pressure-pass"}, timeout=30
        ).json()["token"]
        self.http.headers["Authorization"] = f"Bearer {token}"
        return [
            self.http.post(f"{self.base}/conversations", json={"title": f"c{i}"}, timeout=30).json()["id"]
            for i in range(conversations)
        ]


def run_pressure(base_url: str, *, chats: int = 40, username: str = "pressure") -> dict:
    """`chats` concurrent posts + `chats` concurrent stream readers + a GET loop measuring latency."""
    client = Client(base_url)
    conversation_ids = client.setup_user(username, chats)
    errors: list[str] = []
    get_latencies: list[float] = []
    stop_gets = threading.Event()

    def get_loop():
        session = requests.Session()
        session.headers.update(client.http.headers)
        while not stop_gets.is_set():
            started = time.perf_counter()
            response = session.get(f"{client.base}/conversations", params={"limit": 20}, timeout=30)
            get_latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                errors.append(f"GET {response.status_code}")
            time.sleep(0.05)

    def chat(conversation_id: int) -> tuple[str | None, float]:
        session = requests.Session()
        session.headers.update(client.http.headers)
        started = time.perf_counter()
        response = session.post(
            f"{client.base}/conversations/{conversation_id}/messages",
            json={"content": "the quick brown fox jumps over the lazy dog"},
            timeout=30,
        )
        if response.status_code != 202:
            errors.append(f"POST {response.status_code} {response.text[:200]}")
            return None, 0.0
        reply_id = response.json()["reply"]["id"]
        reply = read_reply(
            session, f"{client.base}/conversations/{conversation_id}/messages/{reply_id}/stream", timeout=(5, 60)
        )
        if reply.status != "complete" or reply.text != "the quick brown fox jumps over the lazy dog":
            errors.append(f"stream {reply.status or f'http {reply.http_status}'} {reply.text[:60]!r}")
        return reply.status, time.perf_counter() - started

    getters = [threading.Thread(target=get_loop) for _ in range(2)]
    for thread in getters:
        thread.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(chats) as pool:
        results = list(pool.map(chat, conversation_ids))
    wall = time.perf_counter() - started
    stop_gets.set()
    for thread in getters:
        thread.join(30)
    finish_times = [seconds for status, seconds in results if status == "complete"]
    return {
        "errors": errors,
        "complete": sum(1 for status, _ in results if status == "complete"),
        "wall_seconds": wall,
        "reply_seconds_max": max(finish_times, default=float("nan")),
        "reply_seconds_median": statistics.median(finish_times) if finish_times else float("nan"),
        "get_count": len(get_latencies),
        "get_p50_ms": percentile(get_latencies, 50) * 1000,
        "get_p95_ms": percentile(get_latencies, 95) * 1000,
        "conversation_ids": conversation_ids,
        "client": client,
    }


def abandon_streams(base_url: str, client: Client, conversation_ids: list[int], readers: int) -> int:
    """Start a reply in each conversation, then `readers` streams that hang up after the first text."""
    reply_urls = []
    for conversation_id in conversation_ids:
        response = client.http.post(
            f"{client.base}/conversations/{conversation_id}/messages",
            json={"content": "a slow answer for readers who leave early"},
            timeout=30,
        )
        response.raise_for_status()
        reply_urls.append(
            f"{client.base}/conversations/{conversation_id}/messages/{response.json()['reply']['id']}/stream"
        )

    def reader(index: int) -> bool:
        session = requests.Session()
        session.headers.update(client.http.headers)
        reply = read_reply(session, reply_urls[index % len(reply_urls)], timeout=(5, 60), stop_after_first=True)
        session.close()  # drop the socket mid-stream
        return reply.abandoned or reply.status == "complete"

    with ThreadPoolExecutor(50) as pool:
        return sum(pool.map(reader, range(readers)))
