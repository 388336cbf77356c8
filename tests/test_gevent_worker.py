"""chatapp under gunicorn's gevent worker (``-k gevent``, gunicorn.conf.py patching first).

An open stream costs a greenlet, not a thread: one worker holds far more streams than a
gthread worker has threads, each waiting on its reply holding no database connection.
psycopg waits cooperatively, so a query stuck in PostgreSQL stops only its own request.
SQLite is refused at start-up: its busy wait would freeze every greenlet of the worker.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import types

import psycopg
import pytest
import requests
import sqlalchemy as sa

from chatapp.config import ConfigError, check_worker_model
from tests.fake_openai import FakeOpenAIServer
from tests.support import databases
from tests.support.databases import ROOT
from tests.support.servers import GunicornServer
from tests.support.sse import Reply, iter_events
from tests.test_gunicorn import CLIENT_TIMEOUT, DatabaseLock, checked_out, make_user, wait_for

pytestmark = pytest.mark.slow
GEVENT = ["--worker-class", "gevent"]
# Far more streams than the worker has threads (2) or database connections (POOL_SIZE).
STREAMS = 150
POOL_SIZE = 2
WORDS = ["Streams", " cost", " no", " thread."]


def gevent_server(database_uri: str, tmp_path, **config) -> GunicornServer:
    """One gevent worker, two threads (which gevent ignores and gthread would be held to)."""
    settings = {
        "SQLALCHEMY_ENGINE_OPTIONS": json.dumps(
            {"pool_size": POOL_SIZE, "max_overflow": 0, "pool_timeout": 30, "pool_pre_ping": True}
        ),
        "WORKER_CONNECTIONS": 1000,
        **config,
    }
    return GunicornServer(database_uri, workers=1, threads=2, config=settings, extra_args=GEVENT, log_dir=tmp_path)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_one_gevent_worker_holds_many_streams_on_a_small_pool(database_uri, postgres_database, tmp_path):
    with FakeOpenAIServer(reply_words=WORDS) as model:
        model.gate = threading.Event()  # every reply sends its first word, then waits here
        config = {
            "BOT_ENGINE": "openai",
            "OPENAI_BASE_URL": model.base_url,
            "TITLES_ENABLED": "false",
            "REPLY_WORKERS": STREAMS,
            "STREAMS_PER_USER": STREAMS,
        }
        with gevent_server(database_uri, tmp_path, **config) as server:
            headers = make_user(server)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                urls = list(pool.map(lambda n: start_reply(server, headers, f"q{n}"), range(STREAMS)))

            first_words = threading.Semaphore(0)
            replies: list[Reply] = []

            # Each client reads to its first word (proof its stream is open and served),
            # then keeps reading to the end; all of them at once.
            def open_and_hold(url: str) -> None:
                with requests.Session() as session:
                    response = session.get(url, headers=headers, stream=True, timeout=(10, 120))
                    chunks = response.iter_content(chunk_size=None)
                    seen = b""
                    for chunk in chunks:
                        seen += chunk
                        if WORDS[0].encode() in seen:
                            break
                    first_words.release()
                    replies.append(read_rest(seen, chunks, response.status_code))

            clients = [threading.Thread(target=open_and_hold, args=(url,), daemon=True) for url in urls]
            for client in clients:
                client.start()
            for n in range(STREAMS):
                assert first_words.acquire(timeout=120), f"only {n} of {STREAMS} streams were served at once"

            # All streams are open and waiting: none holds a connection, and other
            # requests, database ones included, are answered meanwhile.
            wait_for(lambda: checked_out(server) == 0, "the pool to be idle while every stream waits")
            for _ in range(5):
                listed = requests.get(server.url + "/api/v1/conversations", headers=headers, timeout=CLIENT_TIMEOUT)
                assert listed.status_code == 200, listed.text
            assert not any(reply.http_status for reply in replies), (replies[:3], server.log())

            peak = PeakCheckedOut(server)
            with peak:
                model.gate.set()
                for client in clients:
                    client.join(120)
            log = server.log()
    assert len(replies) == STREAMS, log
    assert {(reply.http_status, reply.status, reply.text) for reply in replies} == {(200, "complete", "".join(WORDS))}
    assert peak.value <= POOL_SIZE
    assert postgres_database.backends_in_state("idle in transaction") == []
    assert "Traceback" not in log, log


def start_reply(server: GunicornServer, headers: dict, content: str) -> str:
    """Post ``content`` in a new conversation; the URL of its reply's stream."""
    conversation = requests.post(server.url + "/api/v1/conversations", json={}, headers=headers, timeout=CLIENT_TIMEOUT)
    messages = f"{server.url}/api/v1/conversations/{conversation.json()['id']}/messages"
    posted = requests.post(messages, json={"content": content}, headers=headers, timeout=CLIENT_TIMEOUT)
    assert posted.status_code == 202, posted.text
    return f"{messages}/{posted.json()['reply']['id']}/stream"


def read_rest(seen: bytes, chunks, http_status: int) -> Reply:
    """The whole reply from a stream of which ``seen`` was read already."""
    text: list[str] = []
    for event in iter_events([seen, *chunks]):
        if event.name == "done":
            return Reply("".join(text), json.loads(event.data)["status"], http_status, event.id)
        if event.name == "reset":
            text.clear()
        elif event.name == "message":
            text.append(event.data)
    return Reply("".join(text), None, http_status)


class PeakCheckedOut:
    """The most connections /metrics showed checked out while the block ran."""

    def __init__(self, server: GunicornServer):
        self.server = server
        self.value = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.value = max(self.value, checked_out(self.server))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(CLIENT_TIMEOUT)


def lock_waiters(database) -> int:
    """Queries of the app waiting on a lock inside PostgreSQL."""
    with psycopg.connect(databases.admin_dsn(database.url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (sa.make_url(database.url).database,),
        ).fetchone()
    return row[0] if row else 0


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_query_stuck_in_postgresql_stops_only_its_own_request(database_uri, postgres_database, tmp_path):
    """psycopg waits for the server through gevent: the worker's other requests go on."""
    with gevent_server(database_uri, tmp_path) as server, DatabaseLock(database_uri) as lock:
        headers = make_user(server)
        outcome: dict = {}
        writer = threading.Thread(
            target=lambda: outcome.update(
                response=requests.post(
                    server.url + "/api/v1/conversations", json={"title": "late"}, headers=headers, timeout=120
                )
            ),
            daemon=True,
        )
        writer.start()
        wait_for(lambda: lock_waiters(postgres_database) == 1, "the write to wait on the table lock")
        # The same (only) worker answers, a database query included, while that query waits.
        assert requests.get(server.url + "/healthz", timeout=CLIENT_TIMEOUT).status_code == 200
        assert requests.get(server.url + "/readyz", timeout=CLIENT_TIMEOUT).status_code == 200
        assert writer.is_alive() and "response" not in outcome and lock_waiters(postgres_database) == 1
        lock.release()
        writer.join(60)
        log = server.log()
    assert outcome["response"].status_code == 201, log
    assert postgres_database.backends_in_state("idle in transaction") == []


def test_gevent_on_sqlite_is_refused_before_any_worker_starts(tmp_path):
    server = gevent_server(f"sqlite:///{tmp_path / 'chatapp.sqlite'}", tmp_path)
    ran = subprocess.run(server.args, cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=60, check=False)
    output = ran.stdout + ran.stderr
    assert ran.returncode != 0, output
    assert "the gevent worker needs PostgreSQL" in output, output
    assert "Booting worker" not in output, output


class FakeMonkey(types.ModuleType):
    """gevent.monkey as a patched process has it (the test process itself is never patched)."""

    def __init__(self):
        super().__init__("gevent.monkey")

    def is_module_patched(self, name: str) -> bool:
        return True


def test_the_start_up_check_refuses_sqlite_and_a_blocking_psycopg_under_gevent(monkeypatch):
    sqlite = {"SQLALCHEMY_DATABASE_URI": "sqlite:///chatapp.sqlite"}
    postgres = {"SQLALCHEMY_DATABASE_URI": "postgresql+psycopg://db/chatapp"}
    check_worker_model(sqlite)  # no gevent: SQLite is fine
    monkeypatch.setitem(sys.modules, "gevent.monkey", FakeMonkey())
    with pytest.raises(ConfigError, match="the gevent worker needs PostgreSQL"):
        check_worker_model(sqlite)
    waiting = types.SimpleNamespace(wait_c=object(), wait_poll=object())
    monkeypatch.setitem(sys.modules, "psycopg.waiting", waiting)
    waiting.wait = waiting.wait_poll  # imported after the patch: waits through gevent
    check_worker_model(postgres)
    waiting.wait = waiting.wait_c  # imported before it: would block the hub
    with pytest.raises(ConfigError, match="psycopg was imported before gevent patched"):
        check_worker_model(postgres)


def test_a_live_stream_rereads_the_database_as_often_as_configured(tmp_path):
    """Each open stream costs one read per STREAM_RECHECK_SECONDS: the knob for thousands of them."""
    from chatapp import create_app
    from chatapp.chat import stream
    from tests.conftest import base_test_config

    app = create_app(base_test_config(f"sqlite:///{tmp_path / 'chatapp.sqlite'}"))
    assert stream._recheck_seconds(app) == stream.LIVE_RECHECK_SECONDS
    app.config["STREAM_RECHECK_SECONDS"] = 30
    assert stream._recheck_seconds(app) == 30.0


@pytest.mark.parametrize("value", [0, -5, "30", True])
def test_start_up_refuses_a_stream_recheck_that_is_not_a_positive_number(value, tmp_path):
    from chatapp import create_app
    from tests.conftest import base_test_config

    config = {**base_test_config(f"sqlite:///{tmp_path / 'chatapp.sqlite'}"), "STREAM_RECHECK_SECONDS": value}
    with pytest.raises(ConfigError, match="STREAM_RECHECK_SECONDS must be a number of seconds above 0"):
        create_app(config)
