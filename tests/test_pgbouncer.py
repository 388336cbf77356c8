"""PgBouncer in transaction pooling mode: chatapp prepares nothing on the server behind it,
and many clients share a few server connections and get right answers."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from chatapp import create_app
from chatapp.config import ConfigError
from chatapp.db import db
from tests.conftest import base_test_config, require_postgres_or_skip
from tests.helpers import assert_no_leaks, wait_for_background_work
from tests.support import databases, pgbouncer
from tests.support.load import wait_until

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/chatapp"


def engine_connect_args(config: dict) -> dict:
    app = create_app({**base_test_config(PG_URL), **config})
    return app.config["SQLALCHEMY_ENGINE_OPTIONS"].get("connect_args", {})


def test_behind_pgbouncer_psycopg_prepares_nothing_on_the_server():
    # Creating the app connects to nothing: engines connect lazily.
    args = engine_connect_args({"DATABASE_POOLER": "pgbouncer"})
    assert "prepare_threshold" in args and args["prepare_threshold"] is None
    # The other per-connection settings stay.
    assert args["connect_timeout"] == 3


def test_straight_to_postgresql_psycopg_prepares_as_usual():
    assert "prepare_threshold" not in engine_connect_args({"DATABASE_POOLER": ""})


def test_an_unknown_pooler_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="DATABASE_POOLER"):
        create_app({**base_test_config(PG_URL), "DATABASE_POOLER": "pgpool"})


@pytest.mark.parametrize(
    "config",
    [
        {"SQLALCHEMY_DATABASE_URI": PG_URL + "?options=-c%20statement_timeout%3D5000"},
        {"SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"options": "-c statement_timeout=5000"}}},
    ],
)
def test_settings_in_the_startup_options_are_refused_behind_pgbouncer(config):
    with pytest.raises(ConfigError, match="ALTER ROLE"):
        create_app({**base_test_config(PG_URL), "DATABASE_POOLER": "pgbouncer", **config})
    # Straight to PostgreSQL they apply, and are left alone.
    create_app({**base_test_config(PG_URL), "DATABASE_POOLER": "", **config})


def test_the_pooler_setting_leaves_sqlite_alone(tmp_path):
    app = create_app({**base_test_config(f"sqlite:///{tmp_path / 'x.sqlite'}"), "DATABASE_POOLER": "pgbouncer"})
    assert "prepare_threshold" not in app.config["SQLALCHEMY_ENGINE_OPTIONS"].get("connect_args", {})


@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_apps_reach_postgresql_through_pgbouncer_when_the_run_asks(app, postgres_database):
    """With CHATAPP_TEST_PGBOUNCER=1 the app's queries go through PgBouncer; without, straight."""
    with app.app_context():
        backend_pid = db.session.scalar(sa.text("SELECT pg_backend_pid()"))
        client_pid = db.session.connection().connection.dbapi_connection.info.backend_pid
        db.session.remove()
    if not pgbouncer.requested():
        assert postgres_database.bouncer is None
        assert client_pid == backend_pid
        return
    bouncer = postgres_database.bouncer
    assert bouncer is not None and app.config["DATABASE_POOLER"] == "pgbouncer"
    assert sa.make_url(app.config["SQLALCHEMY_DATABASE_URI"]).port == bouncer.port
    # PgBouncer answers with a process id of its own; the server's is another.
    assert client_pid != backend_pid
    assert postgres_database.name in [row[0] for row in bouncer.admin("SHOW POOLS")]


CLIENTS = 24
MESSAGES_PER_CLIENT = 4
SERVER_CONNECTIONS = 2


@pytest.fixture
def pooled_database():
    """A database of its own (so that pg_stat_activity counts only this test's connections)
    behind a PgBouncer with 2 server connections; its URL through PgBouncer."""
    base_url = databases.postgres_base_url()
    require_postgres_or_skip(base_url)
    if pgbouncer.binary() is None:
        if os.environ.get("CI") == "true" or pgbouncer.requested():
            pytest.fail("pgbouncer is not installed (apt-get install -y pgbouncer)")
        pytest.skip("pgbouncer is not installed")
    server_url = pgbouncer.direct(base_url)
    database = databases.PostgresDatabase(server_url, prefix="chatapp_pgbouncer")
    database.create()
    try:
        migrator = create_app(base_test_config(database.url))
        with migrator.app_context():
            from chatapp.db.schema import upgrade_to_latest

            upgrade_to_latest()
            db.engine.dispose()
        with pgbouncer.PgBouncer(server_url, pool_size=SERVER_CONNECTIONS) as bouncer:
            yield database, bouncer.url_for(database.url), bouncer
    finally:
        database.drop()


def client_session(app, index: int, start: threading.Barrier, failures: list) -> None:
    """One client: registers, then sends messages one after another, reading each reply back."""
    client = app.test_client()
    auth = {"username": f"pooled{index}", "password": "correct horse"}
    try:
        assert client.post("/api/v1/users", json=auth).status_code == 201
        token = client.post("/api/v1/tokens", json=auth).get_json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        start.wait(timeout=60)
        created = client.post("/api/v1/conversations", headers=headers, json={"title": f"chat {index}"})
        assert created.status_code == 201, created.get_json()
        url = f"/api/v1/conversations/{created.get_json()['id']}/messages"
        expected = []
        for number in range(MESSAGES_PER_CLIENT):
            content = f"client {index} message {number}"
            posted = client.post(url, headers=headers, json={"content": content})
            assert posted.status_code == 202, posted.get_json()
            expected += [("user", content, "complete"), ("assistant", content, "complete")]

            def answered(expected=tuple(expected)):
                listed = client.get(url, headers=headers)
                assert listed.status_code == 200, listed.get_json()
                items = listed.get_json()["items"]
                return [(m["role"], m["content"], m["status"]) for m in items] == list(expected)

            assert wait_until(answered, 60, interval=0.05), f"client {index}: reply {number} never came right"
    except BaseException as exc:  # every thread's failure is reported, not only the first
        failures.append(f"client {index}: {exc!r}")


@pytest.mark.slow
def test_many_clients_share_two_server_connections_through_pgbouncer(pooled_database, caplog):
    database, url, bouncer = pooled_database
    app = create_app(
        {
            **base_test_config(url),
            "DATABASE_POOLER": "pgbouncer",
            # Room for every client thread and reply thread to hold a connection to PgBouncer.
            "SQLALCHEMY_ENGINE_OPTIONS": {"pool_size": 40, "max_overflow": 0, "pool_timeout": 30},
        }
    )
    with app.app_context():
        engine = db.engine
    held, most_held, lock = [0], [0], threading.Lock()

    @event.listens_for(engine, "checkout")
    def _out(*args):
        with lock:
            held[0] += 1
            most_held[0] = max(most_held[0], held[0])

    @event.listens_for(engine, "checkin")
    def _in(*args):
        with lock:
            held[0] -= 1

    server_counts: list[int] = []
    done = threading.Event()

    def watch_the_server():
        while not done.is_set():
            server_counts.append(database.connection_count())
            done.wait(0.02)

    watcher = threading.Thread(target=watch_the_server, name="pg-watcher")
    failures: list[str] = []
    start = threading.Barrier(CLIENTS)
    clients = [
        threading.Thread(target=client_session, args=(app, index, start, failures), name=f"client-{index}")
        for index in range(CLIENTS)
    ]
    caplog.set_level(logging.WARNING)
    watcher.start()
    try:
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=300)
    finally:
        done.set()
        watcher.join()
        wait_for_background_work(app)
        assert_no_leaks(app)
        engine.dispose()

    assert not any(thread.is_alive() for thread in clients), "a client hung"
    assert failures == [], "\n".join(failures[:10])
    problems = [r.getMessage() for r in caplog.records if "prepared statement" in r.getMessage()]
    assert problems == []
    # Many clients at once on the app's side, never more than PgBouncer's 2 on the server's.
    assert most_held[0] > SERVER_CONNECTIONS * 4, most_held[0]
    assert 0 < max(server_counts) <= SERVER_CONNECTIONS, sorted(set(server_counts))
    pools = [row for row in bouncer.admin("SHOW POOLS") if row[0] == database.name]
    assert pools, bouncer.admin("SHOW POOLS")
    assert len(databases.stored_messages(database.url)) == CLIENTS * MESSAGES_PER_CLIENT * 2
