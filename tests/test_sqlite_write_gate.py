"""SQLite's process-local write gate (chatapp.db.begin_write).

Writers of one process queue on a Python lock before they check out a connection, so
a waiting writer holds no pooled connection and is woken as soon as the gate is free,
instead of sleeping in SQLite's busy handler. The gate must be left on every path.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import sqlalchemy as sa

from chatapp.auth.models import User
from chatapp.config import Defaults
from chatapp.db import begin_write, db, dispose_engines_after_fork, is_transient, remove_session, unit_of_work
from chatapp.db import sqlite as db_module
from tests.helpers import checked_out, writer_holding_the_gate

# The gate exists on SQLite only: these tests have no PostgreSQL leg.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])

SMALL_POOL = {"SQLALCHEMY_ENGINE_OPTIONS": {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}}
SHORT_BUSY = {"SQLITE_BUSY_TIMEOUT_MS": 200}


def gate_lock(app) -> threading.Lock:
    with app.app_context():
        return db_module._WRITE_GATES[db.engine].lock


def count_users(app) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(User))


@sqlite_only
def test_a_waiting_writer_queues_on_the_gate_holding_no_connection(app):
    started, finished, errors = threading.Event(), threading.Event(), []

    def second_writer():
        started.set()
        try:
            with unit_of_work(app) as session:
                session.add(User(username="second", password_hash="x"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finished.set()

    with writer_holding_the_gate(app):
        assert checked_out(app) == 1
        waiter = threading.Thread(target=second_writer)
        waiter.start()
        assert started.wait(10)
        # Without the gate the second writer checks out a connection at once and waits
        # in SQLite's busy handler (10 s here): two connections out within this window.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert checked_out(app) == 1, "the waiting writer holds a connection"
            time.sleep(0.01)
        assert not finished.is_set()
    # The holder committed: the waiter goes through at once, not after a busy-handler sleep.
    waiter.join(5)
    assert finished.is_set() and not errors, errors
    assert count_users(app) == 2
    assert not gate_lock(app).locked()


@sqlite_only
@pytest.mark.parametrize("end", ["commit", "rollback", "close", "remove_session"])
def test_the_gate_is_left_when_the_transaction_ends(app, end):
    lock = gate_lock(app)
    with app.app_context():
        begin_write()
        db.session.add(User(username="u", password_hash="x"))
        db.session.flush()  # an inner (flush) transaction ends: the gate stays
        assert lock.locked()
        if end == "remove_session":
            remove_session()
        else:
            getattr(db.session, end)()
        assert not lock.locked()
        # And exactly once: a later end of the session releases nothing more.
        remove_session()
    assert not lock.locked()
    assert count_users(app) == (1 if end == "commit" else 0)


@sqlite_only
def test_the_gate_is_left_when_a_unit_of_work_raises(app):
    lock = gate_lock(app)
    with pytest.raises(RuntimeError, match="the block's own error"):
        with unit_of_work(app) as session:
            session.add(User(username="u", password_hash="x"))
            session.flush()
            assert lock.locked()
            raise RuntimeError("the block's own error")
    assert not lock.locked()
    assert count_users(app) == 0


@sqlite_only
def test_the_gate_is_left_when_the_connection_died_under_the_session(app):
    lock = gate_lock(app)
    with app.app_context():
        begin_write()
        assert lock.locked()
        # As in tests/test_faults.py: the DBAPI connection dies under SQLAlchemy, so the
        # session's closing rollback raises.
        db.session.connection().connection.dbapi_connection.close()
        remove_session()
    assert not lock.locked()
    with unit_of_work(app) as session:  # the next writer gets in at once
        session.add(User(username="after", password_hash="x"))
    assert count_users(app) == 1


@sqlite_only
@pytest.mark.parametrize("extra_config", [SMALL_POOL], indirect=True)
def test_the_gate_is_left_when_no_connection_can_be_checked_out(app):
    lock = gate_lock(app)
    with app.app_context():
        other = db.engine.connect()  # the pool's only connection
    try:
        with app.app_context():
            with pytest.raises(sa.exc.TimeoutError):
                begin_write()
            assert not lock.locked()
            remove_session()
    finally:
        other.close()
    assert not lock.locked()
    with unit_of_work(app) as session:
        session.add(User(username="after", password_hash="x"))
    assert count_users(app) == 1


@sqlite_only
def test_the_gate_is_left_when_connecting_fails(app, monkeypatch):
    lock = gate_lock(app)
    with app.app_context():
        engine = db.engine

        def refuse():
            raise sa.exc.OperationalError("connect", {}, Exception("unable to open database file"))

        monkeypatch.setattr(engine, "connect", refuse)
        with pytest.raises(sa.exc.OperationalError, match="unable to open"):
            begin_write()
        assert not lock.locked()
        remove_session()
        monkeypatch.undo()


@sqlite_only
@pytest.mark.parametrize("extra_config", [SHORT_BUSY], indirect=True)
def test_a_busy_gate_times_out_as_a_transient_operational_error_holding_nothing(app):
    with writer_holding_the_gate(app):
        with app.app_context():
            started = time.monotonic()
            with pytest.raises(sa.exc.OperationalError, match="write gate busy") as caught:
                begin_write()
            waited = time.monotonic() - started
            assert is_transient(caught.value)  # reply writers retry it
            assert 0.15 < waited < 5
            assert checked_out(app) == 1  # the holder's only
            assert db_module._WRITE_GATE_KEY not in db.session().info
            remove_session()
    assert not gate_lock(app).locked()
    assert count_users(app) == 1


@sqlite_only
@pytest.mark.parametrize("extra_config", [SHORT_BUSY], indirect=True)
def test_a_post_that_meets_a_busy_gate_is_a_503(app, client, auth, caplog):
    headers = auth.headers()
    with writer_holding_the_gate(app), caplog.at_level(logging.WARNING, logger="chatapp.errors.handlers"):
        response = client.post("/api/v1/conversations", json={"title": "busy"}, headers=headers)
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "database_unavailable"
    assert response.headers["Retry-After"]
    assert "write gate busy" in caplog.text  # the gate answered, not SQLite's busy handler
    assert not gate_lock(app).locked()
    response = client.post("/api/v1/conversations", json={"title": "free"}, headers=headers)
    assert response.status_code == 201, response.get_json()


@sqlite_only
def test_a_forked_child_does_not_inherit_a_held_gate(app):
    with writer_holding_the_gate(app):
        pid = os.fork()
        if pid == 0:  # the child: the parent's holder thread does not exist here
            code = 1
            try:
                dispose_engines_after_fork()  # as gunicorn's post_fork does
                with app.app_context():
                    # The database is still locked by the parent: only the gate is tested.
                    gate = db_module._WRITE_GATES[db.engine]
                    code = 0 if gate.lock.acquire(timeout=1) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@sqlite_only
def test_sqlite_engines_do_not_pre_ping(app):
    assert Defaults.SQLALCHEMY_ENGINE_OPTIONS["pool_pre_ping"] is True  # dropped for SQLite only
    with app.app_context():
        assert db.engine.pool._pre_ping is False


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_engines_keep_pre_ping(app):
    with app.app_context():
        assert db.engine.pool._pre_ping is True
