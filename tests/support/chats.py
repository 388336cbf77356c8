"""Chats for tests/test_multi_host.py and bench/multi_host.py: the model they talk to and
the clients that post and stream as a browser would.

The model is a fake OpenAI-compatible server streaming a known text per message, logging
when it sent each first token. A client posts with an Idempotency-Key (again, until
acknowledged) and streams the reply, reconnecting with Last-Event-ID when the stream breaks.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from tests.support.sse import iter_events


def words_for(content: str, count: int) -> list[str]:
    """The model's reply to a message: ``count`` words naming the message, so no two replies match."""
    return [f" {content.replace(' ', '-')}/w{n}" for n in range(count)]


class ChatModel:
    """A fake OpenAI-compatible model on ``address``: ``words`` words per reply, ``delay`` s apart,
    the first after ``first_delay`` s (a real model's reading of the prompt).

    ``first_sent[content]`` lists when (time.time()) each request for that message got its
    first token, for time-to-first-token measured from the model's own send.
    """

    def __init__(self, address: str, words: int, delay: float, first_delay: float = 0.0):
        self.words = words
        self.delay = delay
        self.first_delay = first_delay
        self.first_sent: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Each token leaves at once (TCP_NODELAY), as model servers send them.
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                content = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for index, word in enumerate(words_for(content, model.words)):
                        time.sleep(model.delay if index else model.first_delay)
                        chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        if index == 0:
                            with model._lock:
                                model.first_sent.setdefault(content, []).append(time.time())
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except OSError:
                    pass  # the worker went away (killed, or its run was stopped)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # hundreds of replies start at once

        self.httpd = Server((address, 0), Handler)
        self.base_url = f"http://{address}:{self.httpd.server_address[1]}/v1"

    def expected(self, content: str) -> str:
        return "".join(words_for(content, self.words))

    def __enter__(self) -> ChatModel:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def sign_up(url: str, conversations: int) -> tuple[str, list[int]]:
    """A user, an API token and ``conversations`` conversations, through the load balancer."""
    credentials = {"username": f"chatter{uuid.uuid4().hex[:8]}", "password": "correct horse"}
    assert requests.post(url + "/api/v1/users", json=credentials, timeout=30).status_code == 201
    token = requests.post(url + "/api/v1/tokens", json=credentials, timeout=30).json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    with requests.Session() as session:
        ids = [
            session.post(url + "/api/v1/conversations", json={}, headers=headers, timeout=30).json()["id"]
            for _ in range(conversations)
        ]
    return token, ids


@dataclass
class Chat:
    """One chat's message and what its client saw."""

    conversation_id: int
    content: str
    acknowledged: bool = False
    reply_id: int | None = None
    post_host: str | None = None
    post_attempts: int = 0
    stream_hosts: list[str] = field(default_factory=list)
    connections: int = 0
    resets: int = 0
    text: str = ""
    status: str | None = None
    stream_opened_at: float | None = None  # time.time() at the client: its first stream answered
    first_text_at: float | None = None
    done_at: float | None = None
    problems: list[str] = field(default_factory=list)


def run_chat(url: str, token: str, chat: Chat, deadline: float) -> Chat:
    """Post ``chat``'s message (again, same Idempotency-Key, until acknowledged), then stream its
    reply to the end, reconnecting with Last-Event-ID whenever the stream breaks."""
    headers = {"Authorization": f"Bearer {token}"}
    messages = f"{url}/api/v1/conversations/{chat.conversation_id}/messages"
    key = uuid.uuid4().hex
    with requests.Session() as session:
        while not chat.acknowledged and time.monotonic() < deadline:
            chat.post_attempts += 1
            try:
                response = session.post(
                    messages, json={"content": chat.content}, headers={**headers, "Idempotency-Key": key}, timeout=30
                )
            except requests.RequestException as error:
                chat.problems.append(f"post: {type(error).__name__}: {str(error)[-80:]}")
                time.sleep(0.2)
                continue
            if response.status_code == 202:
                chat.acknowledged = True
                chat.reply_id = response.json()["reply"]["id"]
                chat.post_host = response.headers.get("X-Served-By")
            else:
                chat.problems.append(f"post: {response.status_code}")
                time.sleep(min(float(response.headers.get("Retry-After", 0.5)), 1.0))
        if not chat.acknowledged:
            return chat
        text: list[str] = []
        last_id = None
        while time.monotonic() < deadline:
            chat.connections += 1
            resume: dict[str, str] = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with session.get(
                    f"{messages}/{chat.reply_id}/stream", headers={**headers, **resume}, stream=True, timeout=(5, 30)
                ) as response:
                    if response.status_code != 200:
                        chat.problems.append(f"stream: {response.status_code}")
                        time.sleep(0.2)
                        continue
                    chat.stream_hosts.append(response.headers.get("X-Served-By", "?"))
                    if chat.stream_opened_at is None:
                        chat.stream_opened_at = time.time()
                    for event in iter_events(response.iter_content(chunk_size=None)):
                        last_id = event.id or last_id
                        if event.name == "message":
                            if chat.first_text_at is None:
                                chat.first_text_at = time.time()
                            text.append(event.data)
                        elif event.name == "reset":
                            text.clear()
                            chat.resets += 1
                        elif event.name == "done":
                            chat.done_at = time.time()
                            chat.status = json.loads(event.data)["status"]
                            chat.text = "".join(text)
                            return chat
            except requests.RequestException as error:
                chat.problems.append(f"stream: {type(error).__name__}: {str(error)[-80:]}")
            # As an EventSource would, after the server's "retry:" (1 s), shortened here.
            time.sleep(0.1)
        chat.text = "".join(text)
        return chat


def epoch(moment) -> float:
    """A timezone-aware (or naive UTC) datetime as time.time() seconds."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
