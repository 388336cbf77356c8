"""The one session registry (Flask-SQLAlchemy's ``db.session``) and the helper for work outside requests."""

from __future__ import annotations

import contextlib
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

# Execution option read by the SQLite "begin" listener below.
SQLITE_BEGIN_OPTION = "chatapp_sqlite_begin"


class Base(DeclarativeBase):
    """Plain declarative base; Flask-SQLAlchemy 3.1 breaks with MappedAsDataclass on SQLAlchemy 2.1."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


# expire_on_commit=False: a view that commits can still render what it just wrote
# without reopening a transaction to reload it.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
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
    """Bind ``db`` to the app and give SQLite engines their per-connection settings."""
    _drop_queue_options_for_memory_sqlite(app.config)
    db.init_app(app)
    with app.app_context():
        # Touches no database: engines connect lazily.
        for engine in db.engines.values():
            _ENGINES.add(engine)
            if engine.dialect.name == "sqlite":
                _configure_sqlite(engine, app.config)


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
    except BaseException:
        session.rollback()
        raise
    finally:
        db.session.remove()
        if ctx is not None:
            ctx.pop()


def dispose_engines_after_fork() -> None:
    """Forget every pooled connection inherited from a parent process (gunicorn post_fork)."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)
