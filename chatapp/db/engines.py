"""Binding ``db`` to an app: engine options, per-connection settings, read retries, fork safety."""

from __future__ import annotations

import weakref

import sqlalchemy as sa
from flask import Flask

from chatapp.config import ConfigError
from chatapp.db import read_retry, sqlite
from chatapp.db.session import remove_session
from chatapp.extensions import db

# Every engine this process created, so a forked worker can drop inherited pools.
_ENGINES: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def init_app(app: Flask) -> None:
    """Bind ``db`` to the app, give engines their per-connection settings, retry reads."""
    sqlite.adjust_engine_options(app.config)
    _default_connect_timeout(app.config)
    _pooler_settings(app.config)
    db.init_app(app)
    # Flask runs teardowns in reverse order of registration: this runs before
    # Flask-SQLAlchemy's own (a bare session.remove(), which raises, a 500 after a
    # finished view, and keeps the session in the registry when the connection died while
    # the request held it), which then finds the registry empty.
    app.teardown_appcontext(_end_session)
    with app.app_context():
        # Touches no database: engines connect lazily.
        for engine in db.engines.values():
            _ENGINES.add(engine)
            if engine.dialect.name == "sqlite":
                sqlite.configure_engine(engine, app.config)
        read_retry.init_app(app, list(db.engines.values()))


def _end_session(exc: BaseException | None) -> None:
    remove_session()


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


# DATABASE_POOLER values: what stands between chatapp and PostgreSQL.
POOLERS = ("", "pgbouncer")


def _pooler_settings(config) -> None:
    # PgBouncer in transaction pooling mode gives each transaction whichever server
    # connection is free, so nothing may outlive a transaction on the server. chatapp sets
    # nothing per session (no SET, advisory lock, LISTEN or temporary table; its
    # connect_timeout is libpq's, not a startup parameter PgBouncer would refuse), but
    # psycopg 3 prepares a statement on the server after its fifth run on a connection
    # (prepare_threshold), and the next run, on another server connection, fails with
    # 'prepared statement "_pg3_0" does not exist'. PgBouncer before 1.21 cannot track
    # protocol-level prepared statements at all, so chatapp prepares nothing behind it.
    pooler = config.get("DATABASE_POOLER") or ""
    if pooler not in POOLERS:
        raise ConfigError(f"chatapp: DATABASE_POOLER must be one of {POOLERS!r}; got {pooler!r}")
    url = sa.make_url(config["SQLALCHEMY_DATABASE_URI"])
    if pooler != "pgbouncer" or url.get_backend_name() != "postgresql" or url.get_driver_name() != "psycopg":
        # psycopg2 never prepares on the server; SQLite has no server.
        return
    options = dict(config["SQLALCHEMY_ENGINE_OPTIONS"])
    connect_args = dict(options.get("connect_args") or {})
    if "options" in connect_args or "options" in url.query:
        # PgBouncer refuses a startup parameter it does not know, or drops it when
        # ignore_startup_parameters lists it: a "-c statement_timeout=..." never applies.
        raise ConfigError(
            "chatapp: with DATABASE_POOLER = 'pgbouncer', PostgreSQL settings cannot travel in the "
            "connection's 'options' (PgBouncer does not pass them on); set them on the role instead: "
            "ALTER ROLE ... SET statement_timeout = '30s'"
        )
    connect_args["prepare_threshold"] = None
    options["connect_args"] = connect_args
    config["SQLALCHEMY_ENGINE_OPTIONS"] = options


def dispose_engines_after_fork() -> None:
    """Forget every pooled connection inherited from a parent process (gunicorn post_fork)."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)
