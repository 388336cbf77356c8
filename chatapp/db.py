"""The one session registry (Flask-SQLAlchemy's ``db.session``) and the helper for work outside requests."""

from __future__ import annotations

import contextlib
import logging
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


class Base(DeclarativeBase):
    """Plain declarative base; Flask-SQLAlchemy 3.1 breaks with MappedAsDataclass on SQLAlchemy 2.1."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class _SQLAlchemy(SQLAlchemy):
    def _teardown_session(self, exc: BaseException | None) -> None:
        # Flask-SQLAlchemy's own teardown is a bare session.remove(), which raises
        # (a 500 after a finished view) and keeps the session in the registry when the
        # connection died while the request held it.
        remove_session()


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


def begin_write(session: Session | None = None) -> None:
    """Start the session's transaction as a writer.

    On SQLite this is ``BEGIN IMMEDIATE``: the write lock is taken (waiting up to the
    busy timeout) before anything is read, so a transaction never has to upgrade a stale
    read snapshot, which SQLite refuses at once with "database is locked". Elsewhere it
    just begins. Call it before the first query of a unit of work that writes.
    """
    session = session if session is not None else db.session()
    if session.in_transaction():
        return
    session.connection(execution_options={SQLITE_BEGIN_OPTION: "IMMEDIATE"})


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
    try:
        db.session.remove()
    except sa.exc.DBAPIError as exc:
        # The connection is back in the pool either way: invalidated if this was a
        # disconnect (the pool opens a new one next time), else reset or discarded
        # by the pool's own rollback on return.
        log.warning("ended a session whose database connection had failed: %s", exc.orig)
    finally:
        db.session.registry.clear()


def dispose_engines_after_fork() -> None:
    """Forget every pooled connection inherited from a parent process (gunicorn post_fork)."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)
