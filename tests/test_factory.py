"""The app factory: configuration order, start-up checks, and no side effects."""

import os

import pytest
import sqlalchemy as sa

from chatapp import create_app
from chatapp.config import ConfigError, Defaults
from chatapp.db import db

# A key the start-up check accepts (32 bytes or more); the tests never sign with it.
KEY = "factory-test-key-0123456789abcdef"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No CHATAPP_* variables, and an empty instance folder (not a checkout's instance/config.py)."""
    for key in list(os.environ):
        if key.startswith("CHATAPP_"):
            monkeypatch.delenv(key)
    empty_instance = tmp_path / "empty-instance"
    monkeypatch.setattr("flask.Flask.auto_find_instance_path", lambda self: str(empty_instance))
    return monkeypatch


def test_testing_config():
    assert not create_app({"SECRET_KEY": KEY, "TESTING": False}).testing
    assert create_app({"TESTING": True}).testing


def test_missing_or_default_secret_key_stops_start_up(clean_env):
    with pytest.raises(ConfigError, match="CHATAPP_SECRET_KEY"):
        create_app({"SQLALCHEMY_DATABASE_URI": "sqlite://"})
    with pytest.raises(ConfigError, match="secrets.token_hex"):
        create_app({"SECRET_KEY": "dev", "SQLALCHEMY_DATABASE_URI": "sqlite://"})
    with pytest.raises(ConfigError):
        create_app({"SECRET_KEY": "", "SQLALCHEMY_DATABASE_URI": "sqlite://"})
    # Testing may run with the default key.
    create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": "sqlite://"})


def test_debug_mode_needs_a_real_key_too(clean_env):
    """A debug server signing cookies with "dev" lets anyone who reaches it forge a login."""
    with pytest.raises(ConfigError, match="missing or left at its default"):
        create_app({"DEBUG": True, "SQLALCHEMY_DATABASE_URI": "sqlite://"})
    with pytest.raises(ConfigError, match="missing or left at its default"):
        create_app({"DEBUG": True, "SECRET_KEY": "dev", "SQLALCHEMY_DATABASE_URI": "sqlite://"})
    assert create_app({"DEBUG": True, "SECRET_KEY": KEY, "SQLALCHEMY_DATABASE_URI": "sqlite://"}).debug


def test_flask_debug_without_a_key_is_refused(clean_env):
    """FLASK_DEBUG=1, as `flask run --debug` sets it, with no key configured."""
    clean_env.setenv("FLASK_DEBUG", "1")
    with pytest.raises(ConfigError, match="secrets.token_hex"):
        create_app({"SQLALCHEMY_DATABASE_URI": "sqlite://"})


@pytest.mark.parametrize(
    "key",
    [
        "gunicorn-test-secret",  # 20 bytes
        "x" * 31,
        "é" * 15 + "x",  # 16 characters, 31 bytes: bytes are what count
        b"\x00" * 31,
    ],
)
def test_a_short_secret_key_stops_start_up(clean_env, key):
    with pytest.raises(ConfigError, match=r"at least 32 bytes.*secrets\.token_hex\(32\)"):
        create_app({"SECRET_KEY": key, "SQLALCHEMY_DATABASE_URI": "sqlite://"})
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        create_app({"SECRET_KEY": key, "DEBUG": True, "SQLALCHEMY_DATABASE_URI": "sqlite://"})
    # Tests are exempt: they sign nothing anyone else could use.
    assert create_app({"SECRET_KEY": key, "TESTING": True, "SQLALCHEMY_DATABASE_URI": "sqlite://"}).testing


@pytest.mark.parametrize("key", ["x" * 32, "é" * 16, b"\x01" * 32, "0123456789abcdef" * 4])
def test_a_32_byte_secret_key_is_accepted(clean_env, key):
    assert create_app({"SECRET_KEY": key, "SQLALCHEMY_DATABASE_URI": "sqlite://"}).config["SECRET_KEY"] == key


def test_a_secret_key_read_as_a_number_is_refused_with_advice(clean_env):
    clean_env.setenv("CHATAPP_SECRET_KEY", "1" * 40)  # CHATAPP_* values are parsed as JSON
    with pytest.raises(ConfigError, match="JSON quotes"):
        create_app({"SQLALCHEMY_DATABASE_URI": "sqlite://"})
    clean_env.setenv("CHATAPP_SECRET_KEY", '"' + "1" * 40 + '"')
    assert create_app({"SQLALCHEMY_DATABASE_URI": "sqlite://"}).config["SECRET_KEY"] == "1" * 40


def test_config_order_defaults_instance_env_test_config(clean_env, tmp_path, monkeypatch):
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "config.py").write_text(
        f"SECRET_KEY = 'from-instance-{KEY}'\nBOT_ENGINE = 'from-instance'\nBOT_ECHO_DELAY = 1.5\n"
    )
    monkeypatch.setattr("flask.Flask.auto_find_instance_path", lambda self: str(instance))
    app = create_app()
    assert app.config["SECRET_KEY"] == f"from-instance-{KEY}"
    assert app.config["BOT_ECHO_DELAY"] == 1.5
    assert app.config["REPLY_FLUSH_INTERVAL"] == Defaults.REPLY_FLUSH_INTERVAL  # a built-in default

    clean_env.setenv("CHATAPP_BOT_ENGINE", "from-env")
    clean_env.setenv("CHATAPP_SQLALCHEMY_ENGINE_OPTIONS__pool_size", "3")
    clean_env.setenv("CHATAPP_SQLALCHEMY_ENGINE_OPTIONS__max_overflow", "1")
    clean_env.setenv("CHATAPP_SQLALCHEMY_ENGINE_OPTIONS__pool_timeout", "2")
    app = create_app()
    assert app.config["SECRET_KEY"] == f"from-instance-{KEY}"
    assert app.config["BOT_ENGINE"] == "from-env"
    options = app.config["SQLALCHEMY_ENGINE_OPTIONS"]
    assert (options["pool_size"], options["max_overflow"], options["pool_timeout"]) == (3, 1, 2)
    # The default database is a SQLite file, whose connections cannot die idle in the pool:
    # no pre-ping (PostgreSQL keeps it: tests/test_sqlite_write_gate.py).
    assert "pool_pre_ping" not in options
    with app.app_context():
        assert db.engine.pool.size() == 3
        assert db.engine.pool._max_overflow == 1
        assert db.engine.pool._timeout == 2
        db.engine.dispose()

    app = create_app({"BOT_ENGINE": "from-test-config"})
    assert app.config["BOT_ENGINE"] == "from-test-config"


def test_default_database_is_sqlite_in_instance_folder_and_factory_touches_nothing(clean_env, tmp_path, monkeypatch):
    instance = tmp_path / "instance"
    monkeypatch.setattr("flask.Flask.auto_find_instance_path", lambda self: str(instance))
    app = create_app({"SECRET_KEY": KEY})
    with app.app_context():
        assert db.engine.url.database == str(instance / "chatapp.sqlite")
        assert db.engine.pool.checkedout() == 0
    # No query and no create_all: the database file does not exist yet.
    assert not (instance / "chatapp.sqlite").exists()


def test_sqlite_connections_get_wal_busy_timeout_and_foreign_keys(app):
    if not app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        pytest.skip("SQLite settings")
    with app.app_context():
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_sqlite_settings_are_overridable(tmp_path):
    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'x.sqlite'}",
            "SQLITE_BUSY_TIMEOUT_MS": 1234,
            "SQLITE_JOURNAL_MODE": "DELETE",
            "SQLITE_FOREIGN_KEYS": False,
        }
    )
    with app.app_context():
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "delete"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 0
        db.engine.dispose()


def test_healthz_does_not_touch_the_database(tmp_path):
    # The database URL points nowhere reachable; healthz must still answer. (The reaper,
    # which the first request of a process starts, is off so that nothing else connects.)
    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": "postgresql+psycopg://nobody@127.0.0.1:1/x",
            "REPLY_SWEEP_INTERVAL": 0,
        }
    )
    connects = []
    with app.app_context():
        sa.event.listen(db.engine, "do_connect", lambda *args: connects.append(args))
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert connects == []
