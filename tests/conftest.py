"""Fixtures: ``app``, ``client``, ``runner`` and ``auth``, on SQLite and on PostgreSQL.

Every test that uses ``app`` is guarded: when it ends, the session registry must be
empty and no pooled connection checked out, so any test that leaks a session fails.
"""

from __future__ import annotations

import contextlib
import os
import threading

import pytest

from chatapp import create_app
from chatapp.db import db
from tests.helpers import AuthActions, assert_no_leaks, wait_for_background_work
from tests.support import databases, pgbouncer

BACKENDS = ["sqlite", "postgresql"]


def base_test_config(uri: str) -> dict:
    return {
        "TESTING": True,
        "SECRET_KEY": "test-secret",
        "SQLALCHEMY_DATABASE_URI": uri,
        # Fast hashing keeps the suite quick; production uses scrypt.
        "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000",
        "WTF_CSRF_ENABLED": False,
        # The periodic reply sweep is started by a test when it wants one.
        "REPLY_SWEEP_INTERVAL": 0,
        # Rate limits are on only in the tests about them (tests/test_security.py).
        "RATELIMIT_ENABLED": False,
        # A reply a bug leaves unfinished ends its stream (and the test) in seconds, not an hour.
        "STREAM_MAX_SECONDS": 30,
    }


def _migrate(uri: str) -> None:
    from chatapp.db.schema import upgrade_to_latest

    app = create_app(base_test_config(uri))
    with app.app_context():
        upgrade_to_latest()
        db.engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("template") / "template.sqlite"
    _migrate(f"sqlite:///{path}")
    return str(path)


def require_postgres_or_skip(base_url: str | None) -> None:
    """Skip the PostgreSQL leg when not configured; fail under CI=true if it is unreachable."""
    variable = databases.TEST_URL_VAR
    if base_url is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {variable} is not set: the PostgreSQL tests must run")
        pytest.skip(f"PostgreSQL tests need {variable}")
    why = databases.postgres_unreachable(base_url)
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {base_url} is unreachable under CI=true: {why}")
        pytest.skip(f"PostgreSQL unreachable: {why}")


@pytest.fixture(scope="session")
def postgres_database():
    base_url = databases.postgres_base_url()
    require_postgres_or_skip(base_url)
    database = databases.PostgresDatabase(base_url)
    database.create()
    with contextlib.ExitStack() as stack:
        # Dropped last, after the PgBouncer in front of it has stopped.
        stack.callback(database.drop)
        if pgbouncer.requested():
            # The apps connect through PgBouncer in transaction pooling mode, the helpers
            # that need the server itself (databases.admin_dsn) straight to PostgreSQL.
            if pgbouncer.binary() is None:
                pytest.fail(f"{pgbouncer.ENV_VAR} is set but pgbouncer is not installed (apt-get install -y pgbouncer)")
            database.route_through(stack.enter_context(pgbouncer.PgBouncer(base_url)))
            stack.enter_context(pgbouncer.pooler_setting())
        _migrate(database.url)
        yield database


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def database_uri(request, backend, tmp_path):
    """A migrated, empty database for one test."""
    if backend == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        target = tmp_path / "chatapp.sqlite"
        databases.copy_sqlite(template, str(target))
        yield f"sqlite:///{target}"
    else:
        database = request.getfixturevalue("postgres_database")
        yield database.url
        from chatapp.db import Base

        database.truncate_all(Base.metadata)


@pytest.fixture
def extra_config(request) -> dict:
    """Config added to the app: parametrize it indirectly, or override it in a module."""
    return getattr(request, "param", {})


@pytest.fixture
def app(database_uri, extra_config, tmp_path):
    app = create_app({**base_test_config(database_uri), **extra_config})
    # Keep instance files of tests out of the repository's instance folder.
    app.instance_path = str(tmp_path / "instance")
    yield app
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


@pytest.fixture(autouse=True)
def leak_guard(request):
    """Fail any test that leaves a session in the registry, a connection checked out, or a sweeper running."""
    app = request.getfixturevalue("app") if "app" in request.fixturenames else None
    sweepers_before = _sweeper_threads()
    yield
    if app is not None:
        wait_for_background_work(app)
        assert_no_leaks(app)
    # The periodic sweep never stops in a process; one started by a test's app would keep
    # connecting to that test's database for the rest of the run.
    started = _sweeper_threads() - sweepers_before
    assert not started, "this test started a periodic reply sweep; set REPLY_SWEEP_INTERVAL=0"


def _sweeper_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "reply-sweeper"}


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def auth(client):
    return AuthActions(client)
