"""The one session registry (Flask-SQLAlchemy's ``db.session``) and the helper for work outside requests."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import weakref
from datetime import datetime, timezone
from typing import Iterator

import sqlalchemy as sa
from flask import Flask, current_app, has_app_context
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Session

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

log = logging.getLogger(__name__)

# Execution option read by the SQLite "begin" listener below.
SQLITE_BEGIN_OPTION = "chatapp_sqlite_begin"
# session.info key: the write-gate lock this session holds until its transaction ends.
_WRITE_GATE_KEY = "chatapp_sqlite_write_gate"


class Base(DeclarativeBase):
    """Plain declarative base; Flask-SQLAlchemy 3.1 breaks with MappedAsDataclass on SQLAlchemy 2.1."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class _SQLAlchemy(SQLAlchemy):
    def _teardown_session(self, exc: BaseException | None) -> None:
        # Flask-SQLAlchemy's own teardown is a bare session.remove(), which raises
        # (a 500 after a finished view) and keeps the session in the registry when the
        # connection died while the request held it.
        remove_session()

    def _apply_driver_defaults(self, options: dict, app: Flask) -> None:
        super()._apply_driver_defaults(options, app)
        # A SQLite connection is a file handle inside this process: it cannot die while
        # idle in the pool, so pre-ping would only add a "SELECT 1" to every checkout.
        # Dropped per engine, not from app.config: PostgreSQL binds keep it.
        if sa.make_url(options["url"]).get_backend_name() == "sqlite":
            options.pop("pool_pre_ping", None)


# expire_on_commit=False: a view that commits can still render what it just wrote
# without reopening a transaction to reload it.
db = _SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
# Every engine this process created, so a forked worker can drop inherited pools.
_ENGINES: "weakref.WeakSet[sa.Engine]" = weakref.WeakSet()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.types.TypeDecorator):
    """A timezone-aware UTC timestamp on every backend (SQLite drops tzinfo on the way back)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def init_app(app: Flask) -> None:
    """Bind ``db`` to the app, give engines their per-connection settings, retry reads."""
    from chatapp import read_retry

    _drop_queue_options_for_memory_sqlite(app.config)
    _default_connect_timeout(app.config)
    db.init_app(app)
    with app.app_context():
        # Touches no database: engines connect lazily.
        for engine in db.engines.values():
            _ENGINES.add(engine)
            if engine.dialect.name == "sqlite":
                _configure_sqlite(engine, app.config)
        read_retry.init_app(app, list(db.engines.values()))


def is_transient(error: BaseException) -> bool:
    """A database error worth retrying later: unreachable, disconnected, locked, pool exhausted."""
    return isinstance(error, (sa.exc.OperationalError, sa.exc.TimeoutError)) or (
        isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated
    )


def _default_connect_timeout(config) -> None:
    # Without a connect timeout, a database host that drops packets (network partition,
    # firewall) leaves every new connection waiting for the kernel's TCP timeout,
    # minutes: requests would hang instead of answering 503 within pool_timeout.
    url = sa.make_url(config["SQLALCHEMY_DATABASE_URI"])
    timeout = config.get("DATABASE_CONNECT_TIMEOUT")
    if (
        not timeout
        or url.get_backend_name() != "postgresql"
        or url.get_driver_name() not in ("psycopg", "psycopg2")
        or "connect_timeout" in url.query
    ):
        return
    options = dict(config["SQLALCHEMY_ENGINE_OPTIONS"])
    connect_args = dict(options.get("connect_args") or {})
    # libpq's unit is whole seconds, and it treats anything below 2 as 2.
    connect_args.setdefault("connect_timeout", max(2, round(float(timeout))))
    options["connect_args"] = connect_args
    config["SQLALCHEMY_ENGINE_OPTIONS"] = options


def _drop_queue_options_for_memory_sqlite(config) -> None:
    # An in-memory SQLite database lives in one connection (StaticPool), which takes
    # no queue-pool options; everything else keeps them.
    url = sa.make_url(config["SQLALCHEMY_DATABASE_URI"])
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        options = dict(config["SQLALCHEMY_ENGINE_OPTIONS"])
        for key in ("pool_size", "max_overflow", "pool_timeout"):
            options.pop(key, None)
        config["SQLALCHEMY_ENGINE_OPTIONS"] = options


def _configure_sqlite(engine: sa.Engine, config) -> None:
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
_WRITE_GATES: "weakref.WeakKeyDictionary[sa.Engine, _WriteGate]" = weakref.WeakKeyDictionary()


def _reset_write_gates_in_child() -> None:
    # A child (gunicorn worker) may inherit a gate locked by a parent thread that does
    # not exist here; it starts with fresh ones. Only one thread runs at this point.
    for gate in list(_WRITE_GATES.values()):
        gate.lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_write_gates_in_child)


def _enter_write_gate(session: Session) -> None:
    gate = _WRITE_GATES.get(session.get_bind())
    if gate is None:  # not SQLite
        return
    # A plain Lock, not per-thread re-entrant: a thread that holds the gate in one
    # session and begins a write in another would wait here until the timeout. No code
    # path does that (the request, unit_of_work in a request and record_token_use all
    # share the request's session), and it would deadlock on SQLite's own lock anyway.
    lock = gate.lock
    if not lock.acquire(timeout=gate.timeout):
        # The same error SQLite gives after its busy timeout: retried by reply writers
        # (is_transient), a 503 for requests.
        raise sa.exc.OperationalError(
            "BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked (write gate busy)")
        )
    session.info[_WRITE_GATE_KEY] = lock


def _leave_write_gate(session: Session) -> None:
    # pop: whichever path comes first releases, and only once.
    lock = session.info.pop(_WRITE_GATE_KEY, None)
    if lock is not None:
        lock.release()


@event.listens_for(Session, "after_transaction_end")
def _leave_write_gate_when_transaction_ends(session: Session, transaction) -> None:
    # Commit, rollback and close all end here (after the connection went back to the
    # pool); flushes and savepoints end inner transactions, which do not count.
    if transaction.parent is None:
        _leave_write_gate(session)


def begin_write(session: Session | None = None) -> None:
    """Start the session's transaction as a writer.

    On SQLite this is ``BEGIN IMMEDIATE``: the write lock is taken (waiting up to the
    busy timeout) before anything is read, so a transaction never has to upgrade a stale
    read snapshot, which SQLite refuses at once with "database is locked". Before that,
    the writer queues on this process's write gate (``_WriteGate``), holding no
    connection, until the writer ahead of it ends its transaction. Elsewhere it just
    begins. Call it before the first query of a unit of work that writes.
    """
    session = session if session is not None else db.session()
    if session.in_transaction():
        return
    # On SQLite, queue on this process's write gate first, holding no connection; the
    # gate is left when the transaction ends (see _leave_write_gate_when_transaction_ends).
    _enter_write_gate(session)
    try:
        session.connection(execution_options={SQLITE_BEGIN_OPTION: "IMMEDIATE"})
    except BaseException:
        # No connection (pool timeout, connect error) or no BEGIN: the session's
        # transaction may stay open without either, so leave the gate now.
        _leave_write_gate(session)
        raise


@contextlib.contextmanager
def unit_of_work(app: Flask | None = None, *, write: bool = True) -> Iterator[Session]:
    """Run one unit of work outside a request: its own session, one commit, always removed.

    Uses the current app context, or pushes one for ``app`` (background threads have
    none). Commits when the block ends, rolls back if it raises, and always removes
    the session so that its connection goes back to the pool.
    """
    ctx = None
    if app is not None and not (has_app_context() and current_app._get_current_object() is app):
        ctx = app.app_context()
        ctx.push()
    elif app is None and not has_app_context():
        raise RuntimeError("unit_of_work() needs an app context or an app to push one for")
    session = db.session()
    try:
        if write:
            begin_write(session)
        yield session
        session.commit()
    finally:
        # Closing rolls back whatever was not committed (the block raised, or the
        # commit failed), and survives a connection that died meanwhile.
        remove_session()
        if ctx is not None:
            ctx.pop()


def remove_session() -> None:
    """End the current scope's session and give back its connection, even a dead one.

    Closing a session rolls its transaction back. When the connection died while the
    session held it (the server restarted, the backend was terminated, the network
    dropped), that rollback raises, though the transaction died with the connection,
    and ``scoped_session.remove()`` then leaves the session in the registry.
    """
    session = db.session.registry() if db.session.registry.has() else None
    try:
        db.session.remove()
    except sa.exc.DBAPIError as exc:
        # The connection is back in the pool either way: invalidated if this was a
        # disconnect (the pool opens a new one next time), else reset or discarded
        # by the pool's own rollback on return.
        log.warning("ended a session whose database connection had failed: %s", exc.orig)
    finally:
        db.session.registry.clear()
        if session is not None:
            # A close that raised skipped after_transaction_end: never keep the gate.
            _leave_write_gate(session)


def dispose_engines_after_fork() -> None:
    """Forget every pooled connection inherited from a parent process (gunicorn post_fork)."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)
