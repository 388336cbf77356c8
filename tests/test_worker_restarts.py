"""Workers that restart or stop neither stall the service nor lose replies (real gunicorn)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from tests.support.databases import active_replies, stored_messages
from tests.support.load import wait_until
from tests.support.servers import GunicornServer
from tests.support.sse import read_reply

pytestmark = pytest.mark.slow
CONTENT = " ".join(f"w{n}" for n in range(40))


def start_chats(url: str, count: int) -> tuple[dict, list[tuple[int, int]]]:
    """Register a user and post ``count`` messages, each in a conversation of its own."""
    credentials = {"username": "restarts", "password": "correct horse"}
    assert requests.post(url + "/api/v1/users", json=credentials, timeout=30).status_code == 201
    token = requests.post(url + "/api/v1/tokens", json=credentials, timeout=30).json()["token"]
    headers = {"Authorization": f"Bearer {token}", "Connection": "close"}
    replies = []
    for n in range(count):
        conversation = requests.post(url + "/api/v1/conversations", json={}, headers=headers, timeout=30).json()
        posted = requests.post(
            f"{url}/api/v1/conversations/{conversation['id']}/messages",
            json={"content": f"{n} {CONTENT}"},
            headers=headers,
            timeout=30,
        )
        assert posted.status_code == 202, posted.text
        replies.append((posted.json()["reply"]["id"], n))
    return headers, replies


def assert_replies_complete(database_uri: str, replies: list[tuple[int, int]]) -> dict:
    rows = stored_messages(database_uri)
    for reply_id, n in replies:
        reply = rows[reply_id]
        assert (reply.status.value, reply.content, reply.error) == ("complete", f"{n} {CONTENT}", None), reply
    return rows


def test_max_requests_restarts_keep_answering_and_lose_no_reply(database_uri, tmp_path):
    # Every worker restarts after 5 requests while 20 s replies run: the exiting worker
    # stops accepting at once (its streams end and resume elsewhere), so GETs go to the
    # other worker or the replacement, never waiting for a reply to end.
    config = {"BOT_ECHO_DELAY": 20, "MAX_REQUESTS": 5, "MAX_REQUESTS_JITTER": 2, "REPLY_SWEEP_INTERVAL": 1}
    with GunicornServer(database_uri, workers=2, threads=8, config=config, log_dir=tmp_path) as server:
        headers, replies = start_chats(server.url, 4)
        started_pids = set(server.worker_pids())
        latencies, failures = [], []
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                response = requests.get(server.url + "/api/v1/conversations", headers=headers, timeout=30)
                if response.status_code != 200:
                    failures.append(response.status_code)
            except requests.RequestException as error:
                failures.append(repr(error))
            latencies.append(time.monotonic() - sent)
            time.sleep(0.05)
        restarted = started_pids - set(server.worker_pids())
        assert wait_until(lambda: active_replies(database_uri) == 0, 90)
        log = server.log()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"\n{len(latencies)} GETs across restarts of {len(restarted)} of the first workers: "
        f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms"
    )
    assert restarted, "no worker restarted"
    assert failures == []
    # A GET never waits for a reply to finish (20 s), as it did when an exiting worker
    # waited for its replies before its replacement could start. (The p99 target, under
    # 1 s, is measured by bench/durable_replies.py; here only what would show that stall.)
    assert latencies[-1] < 15.0, latencies[-5:]
    assert_replies_complete(database_uri, replies)
    assert "Traceback" not in log, log


def test_term_hands_unfinished_replies_over_and_the_next_server_finishes_them(database_uri, tmp_path):
    # Replies far longer than the hand-over time: the stopping workers give their leases
    # up, and the next server (a deploy) takes them over at boot, without waiting for
    # the leases to expire.
    config = {"BOT_ECHO_DELAY": 30, "REPLY_HANDOVER_SECONDS": 1, "REPLY_SWEEP_INTERVAL": 1, "REPLY_LEASE_SECONDS": 60}
    server = GunicornServer(database_uri, workers=2, threads=8, config=config, log_dir=tmp_path).start()
    try:
        _headers, replies = start_chats(server.url, 4)
        time.sleep(2)
        stopping = time.monotonic()
        server.stop()
        stopped_in = time.monotonic() - stopping
        first_log = server.log()
    finally:
        server.stop()
    assert active_replies(database_uri) == 4
    assert "handing over" in first_log, first_log
    config["BOT_ECHO_DELAY"] = 1
    with GunicornServer(database_uri, workers=2, threads=8, config=config, log_dir=tmp_path) as second:
        # Leases of 60 s: only the hand-over lets the new server start them this soon.
        taken_over = wait_until(lambda: active_replies(database_uri) == 0, 20)
        log = second.log()
    print(f"\nthe first server stopped in {stopped_in:.1f} s; the second finished its replies")
    assert stopped_in < 15, "a stopping worker waited for its replies past the hand-over time"
    assert taken_over, log
    rows = assert_replies_complete(database_uri, replies)
    assert all(rows[reply_id].attempt == 1 for reply_id, _ in replies)  # run again, once
    assert "Traceback" not in first_log + log


def test_a_stream_on_a_restarting_worker_resumes_on_another(database_uri, tmp_path):
    config = {"BOT_ECHO_DELAY": 6, "REPLY_SWEEP_INTERVAL": 1, "REPLY_FLUSH_INTERVAL": 0.1}
    with GunicornServer(database_uri, workers=2, threads=8, config=config, log_dir=tmp_path) as server:
        headers, [(reply_id, n)] = start_chats(server.url, 1)
        stream_url = (
            f"{server.url}/api/v1/conversations/"
            f"{stored_conversation(database_uri, reply_id)}/messages/{reply_id}/stream"
        )
        text, ended = [], threading.Event()

        def follow():
            # An EventSource-like reader: reconnects with Last-Event-ID until done.
            last_id = None
            while not ended.is_set():
                extra = {"Last-Event-ID": last_id} if last_id else {}
                reply = read_reply(None, stream_url, headers={**headers, **extra}, timeout=30)
                if reply.reset:
                    text.clear()
                text.append(reply.text)
                last_id = reply.last_event_id or last_id
                if reply.status is not None:
                    ended.set()

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        time.sleep(2)
        for pid in server.worker_pids():
            os.kill(pid, signal.SIGTERM)  # each worker restarts (the master replaces it)
        reader.join(40)
        assert ended.is_set(), server.log()
    assert "".join(text) == f"{n} {CONTENT}"


def stored_conversation(database_uri: str, reply_id: int) -> int:
    return stored_messages(database_uri)[reply_id].conversation_id
