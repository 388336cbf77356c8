"""SQLite's behaviour: per-connection settings, BEGIN IMMEDIATE for writers, and this
process's write gate, where writers queue for the database's one write lock."""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

# Execution option read by the SQLite "begin" listener below.
SQLITE_BEGIN_OPTION = "chatapp_sqlite_begin"
# session.info key: the write-gate lock this session holds until its transaction ends.
_WRITE_GATE_KEY = "chatapp_sqlite_write_gate"


def is_sqlite(uri: str) -> bool:
    return sa.make_url(uri).get_backend_name() == "sqlite"


def adjust_engine_options(config) -> None:
    """Drop the engine options that make no sense for the configured SQLite database."""
    if not is_sqlite(config["SQLALCHEMY_DATABASE_URI"]):
        return
    options = dict(config["SQLALCHEMY_ENGINE_OPTIONS"])
    # A SQLite connection is a file handle inside this process: it cannot die while
    # idle in the pool, so pre-ping would only add a "SELECT 1" to every checkout.
    options.pop("pool_pre_ping", None)
    # An in-memory SQLite database lives in one connection (StaticPool), which takes
    # no queue-pool options; a file database keeps them.
    if sa.make_url(config["SQLALCHEMY_DATABASE_URI"]).database in (None, "", ":memory:"):
        for key in ("pool_size", "max_overflow", "pool_timeout"):
            options.pop(key, None)
    config["SQLALCHEMY_ENGINE_OPTIONS"] = options


def configure_engine(engine: sa.Engine, config) -> None:
    """Give every new connection its pragmas, and let writers begin with BEGIN IMMEDIATE."""
    pragmas = [
        f"PRAGMA busy_timeout = {int(config['SQLITE_BUSY_TIMEOUT_MS'])}",
        f"PRAGMA foreign_keys = {'ON' if config['SQLITE_FOREIGN_KEYS'] else 'OFF'}",
        f"PRAGMA synchronous = {config['SQLITE_SYNCHRONOUS']}",
    ]
    journal_mode = config["SQLITE_JOURNAL_MODE"]

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, connection_record):
        # Let SQLAlchemy, not pysqlite, decide when a transaction begins, so that
        # writers can take the write lock up front with BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if journal_mode:
                cursor.execute(f"PRAGMA journal_mode = {journal_mode}")
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection):
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        if mode == "DEFERRED":
            # A reader's BEGIN takes no lock and cannot be busy: sent straight to the
            # driver, without SQLAlchemy's statement machinery around it (every request
            # begins one). Should it fail all the same, it is sent again the usual way,
            # which raises SQLAlchemy's error (and runs its error handling) if it fails again.
            try:
                connection.connection.driver_connection.execute("BEGIN DEFERRED").close()
                return
            except sqlite3.Error:
                pass
        connection.exec_driver_sql(f"BEGIN {mode}")

    _WRITE_GATES[engine] = _WriteGate(int(config["SQLITE_BUSY_TIMEOUT_MS"]) / 1000)


class _WriteGate:
    """Where this process's SQLite writers queue for the database's one write lock.

    SQLite's busy handler polls with sleeps of up to 100 ms, and a writer waits in it
    holding a pooled connection. Writers of one process queue here instead, before they
    check out a connection: a Python lock wakes the next one as soon as it is released,
    and only one writer per process ever waits inside SQLite (on other processes).
    """

    def __init__(self, timeout: float):
        self.timeout = timeout  # the busy timeout: a writer waits no longer here than there
        self.lock = threading.Lock()


# One gate per SQLite engine of this process.
_WRITE_GATES: weakref.WeakKeyDictionary[sa.Engine, _WriteGate] = weakref.WeakKeyDictionary()


def _reset_write_gates_in_child() -> None:
    # A child (gunicorn worker) may inherit a gate locked by a parent thread that does
    # not exist here; it starts with fresh ones. Only one thread runs at this point.
    for gate in list(_WRITE_GATES.values()):
        gate.lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_write_gates_in_child)


def enter_write_gate(session: Session) -> None:
    """Queue on the session's engine's write gate (SQLite only), holding no connection."""
    bind = session.get_bind()
    gate = _WRITE_GATES.get(bind) if isinstance(bind, sa.Engine) else None
    if gate is None:  # not SQLite
        return
    # A plain Lock, not per-thread re-entrant: a thread that holds the gate in one
    # session and begins a write in another would wait here until the timeout. No code
    # path does that (a request's view and its after-request stamps share the request's
    # session, one transaction after the other), and it would deadlock on SQLite's own
    # lock anyway.
    lock = gate.lock
    if not lock.acquire(timeout=gate.timeout):
        # The same error SQLite gives after its busy timeout: retried by reply writers
        # (is_transient), a 503 for requests.
        raise sa.exc.OperationalError(
            "BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked (write gate busy)")
        )
    session.info[_WRITE_GATE_KEY] = lock


def needs_write_gate(session: Session) -> bool:
    """Whether the session's database is SQLite and the session is not inside the write gate."""
    return _WRITE_GATE_KEY not in session.info and session.get_bind() in _WRITE_GATES


def leave_write_gate(session: Session) -> None:
    """Let the next writer in; whichever path comes first releases, and only once."""
    lock = session.info.pop(_WRITE_GATE_KEY, None)
    if lock is not None:
        lock.release()


@event.listens_for(Session, "after_transaction_end")
def _leave_write_gate_when_transaction_ends(session: Session, transaction) -> None:
    # Commit, rollback and close all end here (after the connection went back to the
    # pool); flushes and savepoints end inner transactions, which do not count.
    if transaction.parent is None:
        leave_write_gate(session)
