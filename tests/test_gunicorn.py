"""chatapp under a real gunicorn (gunicorn.conf.py): access log, reloads and recycling under
load, and a pool that is truly exhausted answering 503 instead of hanging.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import threading
import time

import psycopg
import pytest
import requests
import sqlalchemy as sa

from tests.support.servers import GunicornServer

pytestmark = pytest.mark.slow
CLIENT_TIMEOUT = 30  # far above any answer the server should give: a hang fails the test


def make_user(server: GunicornServer, username: str = "loaded") -> dict:
    credentials = {"username": username, "password": "correct horse"}
    assert requests.post(server.url + "/api/v1/users", json=credentials, timeout=CLIENT_TIMEOUT).status_code == 201
    response = requests.post(server.url + "/api/v1/tokens", json=credentials, timeout=CLIENT_TIMEOUT)
    return {"Authorization": f"Bearer {response.json()['token']}"}


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


class SteadyLoad:
    """Threads sending reads and writes back to back, recording every outcome.

    Half the threads open a fresh connection per request (new connections must be
    accepted throughout), half keep one alive (open connections must be closed cleanly).
    """

    def __init__(self, url: str, headers: dict, threads: int = 4):
        self.url, self.headers = url, headers
        self.stop_event = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def _run(self, n: int) -> None:
        http = requests.Session() if n % 2 else requests
        i = 0
        while not self.stop_event.is_set():
            i += 1
            try:
                if i % 4 == 0:
                    response = http.post(
                        self.url + "/api/v1/conversations",
                        json={"title": f"t{n}-{i}"},
                        headers=self.headers,
                        timeout=CLIENT_TIMEOUT,
                    )
                    expected = 201
                else:
                    response = http.get(
                        self.url + "/api/v1/conversations", headers=self.headers, timeout=CLIENT_TIMEOUT
                    )
                    expected = 200
                outcome = None if response.status_code == expected else f"{response.status_code}: {response.text[:200]}"
            except requests.RequestException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with self.lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failures.append(outcome)

    def served(self) -> int:
        with self.lock:
            return self.ok

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT + 5)


# --- access log ---------------------------------------------------------------------------


def test_access_log_names_request_id_and_duration(database_uri, tmp_path):
    with GunicornServer(database_uri, workers=1, threads=2, log_dir=tmp_path) as server:
        given = requests.get(server.url + "/healthz", headers={"X-Request-ID": "probe-4f2a.1"}, timeout=10)
        generated = requests.get(server.url + "/api/v1/conversations", timeout=10)
        assert given.headers["X-Request-ID"] == "probe-4f2a.1"
        assert generated.status_code == 401
        rid = generated.headers["X-Request-ID"]
        log = wait_for(lambda: rid in server.log_text() and server.log_text(), "the access log lines")
    assert re.search(r'"GET /healthz HTTP/1\.1" 200 \d+ .* request_id=probe-4f2a\.1 duration_ms=\d+', log), log
    assert re.search(rf'"GET /api/v1/conversations HTTP/1\.1" 401 \d+ .* request_id={rid} duration_ms=\d+', log), log


# --- reloads and recycling under load ---------------------------------------------------------


def test_hup_reload_under_load_fails_no_request(database_uri, tmp_path):
    with GunicornServer(database_uri, workers=2, threads=4, log_dir=tmp_path) as server:
        headers = make_user(server)
        old = set(server.worker_pids())
        with SteadyLoad(server.url, headers) as load:
            wait_for(lambda: load.served() >= 20, "load to get going")
            server.process.send_signal(signal.SIGHUP)
            # New workers replace every old one while the requests keep coming...
            wait_for(
                lambda: len(server.worker_pids()) == 2 and not old & set(server.worker_pids()),
                "the old workers to be replaced",
                timeout=120,
            )
            # ...and the new ones serve them.
            after_reload = load.served()
            wait_for(lambda: load.served() >= after_reload + 20, "requests served by the new workers")
        assert load.failures == [], load.failures[:5]
        assert "Traceback" not in server.log_text()
    print(f"\nHUP under load: {load.ok} requests, 0 failed")


def test_workers_recycled_by_max_requests_fail_no_request(database_uri, tmp_path):
    config = {"MAX_REQUESTS": 30, "MAX_REQUESTS_JITTER": 10}
    with GunicornServer(database_uri, workers=2, threads=4, config=config, log_dir=tmp_path) as server:
        headers = make_user(server)
        seen = set(server.worker_pids())
        with SteadyLoad(server.url, headers) as load:

            def recycled_twice() -> bool:
                seen.update(server.worker_pids())
                return len(seen) >= 6

            wait_for(recycled_twice, "workers to be recycled by max_requests")
        assert load.failures == [], load.failures[:5]
    print(f"\nmax_requests recycling: {len(seen)} workers over {load.ok} requests, 0 failed")


# --- pool exhaustion --------------------------------------------------------------------------


class DatabaseLock:
    """Hold a lock in the database from outside the app, so the app's one connection gets stuck."""

    def __init__(self, database_uri: str):
        self.url = sa.make_url(database_uri)
        self.connection = None

    def __enter__(self):
        if self.url.get_backend_name() == "sqlite":
            self.connection = sqlite3.connect(self.url.database, isolation_level=None)
            self.connection.execute("BEGIN IMMEDIATE")  # writers wait on this
        else:
            dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self.connection = psycopg.connect(dsn)
            self.connection.execute("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE")
        return self

    def release(self):
        if self.connection is not None:
            self.connection.rollback()
            self.connection.close()
            self.connection = None

    def __exit__(self, *exc):
        self.release()


def checked_out(server: GunicornServer) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("chatapp_db_pool_checked_out{")
    )


def test_exhausted_pool_answers_503_with_retry_after_and_recovers(database_uri, tmp_path):
    config = {
        "SQLALCHEMY_ENGINE_OPTIONS": json.dumps(
            {"pool_size": 1, "max_overflow": 0, "pool_timeout": 1, "pool_pre_ping": True}
        ),
        "SQLITE_BUSY_TIMEOUT_MS": 60_000,
        "REPLY_SWEEP_INTERVAL": 0,  # no background pass competing for the one connection
    }
    with GunicornServer(database_uri, workers=1, threads=8, config=config, log_dir=tmp_path) as server:
        headers = make_user(server)
        url = server.url + "/api/v1/conversations"
        with DatabaseLock(database_uri) as lock:
            # This write waits on the lock inside the database, holding the pool's only connection.
            blocked: dict = {}
            writer = threading.Thread(
                target=lambda: blocked.update(
                    response=requests.post(url, json={"title": "late"}, headers=headers, timeout=120)
                ),
                daemon=True,
            )
            writer.start()
            wait_for(lambda: checked_out(server) == 1, "the writer to hold the only connection")

            answers: list = []

            def call() -> None:
                started = time.monotonic()
                try:
                    response = requests.get(url, headers=headers, timeout=CLIENT_TIMEOUT)
                    answers.append((response, time.monotonic() - started))
                except requests.RequestException as exc:
                    answers.append((exc, time.monotonic() - started))

            callers = [threading.Thread(target=call) for _ in range(12)]  # more than the free threads
            for thread in callers:
                thread.start()
            for thread in callers:
                thread.join(CLIENT_TIMEOUT + 5)
            # The process still answers what needs no database.
            assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
            lock.release()
            writer.join(60)

        assert len(answers) == 12
        for response, _elapsed in answers:
            assert isinstance(response, requests.Response), response
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "database_busy"
            assert int(response.headers["Retry-After"]) >= 1
        # The stuck write went through once the lock was gone, and service is back at once.
        assert blocked["response"].status_code == 201, blocked["response"].text
        assert requests.get(url, headers=headers, timeout=10).status_code == 200
        assert checked_out(server) == 0
        log = server.log_text()
        assert "database pool exhausted" in log and "Traceback" not in log
    waits = sorted(elapsed for _r, elapsed in answers)
    print(f"\npool exhausted: 12/12 answered 503 in {waits[0]:.2f}-{waits[-1]:.2f} s (pool_timeout=1)")


# --- open streams per user ----------------------------------------------------------------------


def test_a_stream_the_client_drops_gives_its_slot_back(database_uri, tmp_path):
    """gunicorn closes a stream's response when its client goes away: the user's slot is freed."""
    config = {"STREAMS_PER_USER": 1, "BOT_ECHO_DELAY": 6, "REPLY_FLUSH_INTERVAL": 0.05, "REPLY_REAP_INTERVAL": 0}
    with GunicornServer(database_uri, workers=1, threads=4, config=config, log_dir=tmp_path) as server:
        headers = make_user(server)
        conversation = requests.post(
            server.url + "/api/v1/conversations", json={}, headers=headers, timeout=CLIENT_TIMEOUT
        ).json()
        words = " ".join(f"w{n}" for n in range(60))  # one word every 0.1 s for 6 s
        posted = requests.post(
            f"{server.url}/api/v1/conversations/{conversation['id']}/messages",
            json={"content": words},
            headers=headers,
            timeout=CLIENT_TIMEOUT,
        ).json()
        url = f"{server.url}/api/v1/conversations/{conversation['id']}/messages/{posted['reply']['id']}/stream"

        first = requests.get(url, headers=headers, stream=True, timeout=CLIENT_TIMEOUT)
        assert first.status_code == 200
        assert next(first.iter_content(chunk_size=None))
        refused = requests.get(url, headers=headers, timeout=CLIENT_TIMEOUT)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
        first.close()  # the client goes away mid-stream

        def open_again():
            response = requests.get(url, headers=headers, stream=True, timeout=CLIENT_TIMEOUT)
            if response.status_code == 200:
                return response
            response.close()
            return None

        # The server notices at the stream's next write (a word every 0.1 s here).
        again = wait_for(open_again, "the dropped stream's slot to be given back", timeout=30)
        again.close()
        # Given back while the reply still streams: not by the stream's normal end.
        messages = requests.get(
            f"{server.url}/api/v1/conversations/{conversation['id']}/messages", headers=headers, timeout=CLIENT_TIMEOUT
        ).json()["items"]
        assert messages[-1]["status"] == "streaming"
        assert "Traceback" not in server.log_text()


def test_the_worker_hooks_leave_another_wsgi_app_alone():
    """gunicorn.conf.py also serves the benchmarks' comparison apps: its chatapp hooks must
    do nothing for an app that is not chatapp (a plain Flask app, a bare WSGI callable)."""
    from types import SimpleNamespace

    from flask import Flask

    from chatapp import lifecycle

    for other in (Flask("plain"), lambda environ, start_response: []):
        worker = SimpleNamespace(wsgi=other, nr=9, max_requests=10, alive=True)
        lifecycle.worker_started(other)
        lifecycle.pace_restart(worker)
        lifecycle.worker_exiting(other, limit=5)
        assert worker.max_requests == 10
