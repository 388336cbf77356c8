"""The app factory: configuration order, start-up checks, and no side effects."""

import os

import pytest
import sqlalchemy as sa

from chatapp import create_app
from chatapp.config import ConfigError, Defaults
from chatapp.db import db


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("CHATAPP_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_testing_config():
    assert not create_app({"SECRET_KEY": "s", "TESTING": False}).testing
    assert create_app({"TESTING": True}).testing


def test_missing_or_default_secret_key_stops_start_up(clean_env):
    with pytest.raises(ConfigError, match="CHATAPP_SECRET_KEY"):
        create_app({"SQLALCHEMY_DATABASE_URI": "sqlite://"})
    with pytest.raises(ConfigError, match="secrets.token_hex"):
        create_app({"SECRET_KEY": "dev", "SQLALCHEMY_DATABASE_URI": "sqlite://"})
    with pytest.raises(ConfigError):
        create_app({"SECRET_KEY": "", "SQLALCHEMY_DATABASE_URI": "sqlite://"})
    # Debug and testing may run with the default key.
    create_app({"DEBUG": True, "SQLALCHEMY_DATABASE_URI": "sqlite://"})
    create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": "sqlite://"})


def test_config_order_defaults_instance_env_test_config(clean_env, tmp_path, monkeypatch):
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "config.py").write_text(
        "SECRET_KEY = 'from-instance'\nBOT_ENGINE = 'from-instance'\nBOT_ECHO_DELAY = 1.5\n"
    )
    monkeypatch.setattr("flask.Flask.auto_find_instance_path", lambda self: str(instance))
    app = create_app()
    assert app.config["SECRET_KEY"] == "from-instance"
    assert app.config["BOT_ECHO_DELAY"] == 1.5
    assert app.config["REPLY_FLUSH_INTERVAL"] == Defaults.REPLY_FLUSH_INTERVAL  # a built-in default

    clean_env.setenv("CHATAPP_BOT_ENGINE", "from-env")
    clean_env.setenv("CHATAPP_SQLALCHEMY_ENGINE_OPTIONS__pool_size", "3")
    clean_env.setenv("CHATAPP_SQLALCHEMY_ENGINE_OPTIONS__max_overflow", "1")
    clean_env.setenv("CHATAPP_SQLALCHEMY_ENGINE_OPTIONS__pool_timeout", "2")
    app = create_app()
    assert app.config["SECRET_KEY"] == "from-instance"
    assert app.config["BOT_ENGINE"] == "from-env"
    options = app.config["SQLALCHEMY_ENGINE_OPTIONS"]
    assert (options["pool_size"], options["max_overflow"], options["pool_timeout"]) == (3, 1, 2)
    assert options["pool_pre_ping"] is True
    with app.app_context():
        assert db.engine.pool.size() == 3
        assert db.engine.pool._max_overflow == 1
        assert db.engine.pool._timeout == 2
        db.engine.dispose()

    app = create_app({"BOT_ENGINE": "from-test-config"})
    assert app.config["BOT_ENGINE"] == "from-test-config"


def test_default_database_is_sqlite_in_instance_folder_and_factory_touches_nothing(
    clean_env, tmp_path, monkeypatch
):
    instance = tmp_path / "instance"
    monkeypatch.setattr("flask.Flask.auto_find_instance_path", lambda self: str(instance))
    app = create_app({"SECRET_KEY": "s"})
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
        {"TESTING": True, "SQLALCHEMY_DATABASE_URI": "postgresql+psycopg://nobody@127.0.0.1:1/x",
         "REPLY_SWEEP_INTERVAL": 0}
    )
    connects = []
    with app.app_context():
        sa.event.listen(db.engine, "do_connect", lambda *args: connects.append(args))
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert connects == []
