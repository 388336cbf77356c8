"""Maintainer commands and the shell release their connections."""

import contextlib
import os
import shutil
import stat
import subprocess
import sys

import sqlalchemy as sa

from chatapp.auth.models import ApiToken, User
from chatapp.auth.services import hash_token
from chatapp.db import db, unit_of_work
from tests.helpers import assert_no_leaks
from tests.support.databases import SECRET_KEY


def test_create_user_with_password_stdin(runner, app):
    result = runner.invoke(args=["create-user", "alice", "--password-stdin"], input="s3cret-pass\n")
    assert result.exit_code == 0, result.output
    assert "Created user 'alice'" in result.output
    assert_no_leaks(app)
    with unit_of_work(app, write=False) as session:
        user = session.scalar(sa.select(User).where(User.username == "alice"))
        assert user.password_hash != "s3cret-pass"
        assert "s3cret-pass" not in user.password_hash


def test_create_user_with_prompt(runner):
    result = runner.invoke(args=["create-user", "bob"], input="long-enough\nlong-enough\n")
    assert result.exit_code == 0, result.output


def test_create_user_errors(runner, app):
    runner.invoke(args=["create-user", "alice", "--password-stdin"], input="s3cret-pass\n")
    taken = runner.invoke(args=["create-user", "alice", "--password-stdin"], input="s3cret-pass\n")
    assert taken.exit_code != 0 and "is taken" in taken.output
    short = runner.invoke(args=["create-user", "carol", "--password-stdin"], input="short\n")
    assert short.exit_code != 0 and "8-200 characters" in short.output
    bad_name = runner.invoke(args=["create-user", "a b", "--password-stdin"], input="long-enough\n")
    assert bad_name.exit_code != 0 and "username must be" in bad_name.output
    assert_no_leaks(app)


def test_create_token_prints_a_token_stored_only_hashed(runner, app):
    runner.invoke(args=["create-user", "alice", "--password-stdin"], input="s3cret-pass\n")
    result = runner.invoke(args=["create-token", "alice"])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert token.startswith("chat_")
    with unit_of_work(app, write=False) as session:
        row = session.scalar(sa.select(ApiToken))
        assert row.token_hash == hash_token(token) and token not in row.token_hash
    unknown = runner.invoke(args=["create-token", "nobody"])
    assert unknown.exit_code != 0 and "no user named 'nobody'" in unknown.output
    assert_no_leaks(app)


def test_commands_refuse_an_uninitialised_database(tmp_path):
    from chatapp import create_app

    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'empty.sqlite'}"})
    runner = app.test_cli_runner()
    result = runner.invoke(args=["create-user", "alice", "--password-stdin"], input="s3cret-pass\n")
    assert result.exit_code != 0
    assert "flask --app chatapp init-db" in result.output
    result = runner.invoke(args=["create-token", "alice"])
    assert "init-db" in result.output
    assert_no_leaks(app)


def run_flask(database_uri: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "CHATAPP_SQLALCHEMY_DATABASE_URI": database_uri,
        "CHATAPP_SECRET_KEY": SECRET_KEY,
        "CHATAPP_PASSWORD_HASH_METHOD": '"pbkdf2:sha256:1000"',
    }
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "chatapp", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


SHELL_SCRIPT = """\
db.session.add(User(username="from_shell", password_hash="x"))
db.session.commit()
print("USERS", [u.username for u in db.session.scalars(sa.select(User)).all()])
names = globals()
print("MODELS", all(name in names for name in ("User", "ApiToken", "Conversation", "Message")))
engine = db.engine
import atexit
_ = atexit.register(lambda: print("CHECKED_OUT_AT_EXIT", engine.pool.checkedout()))
"""


def test_flask_shell_preloads_names_and_returns_connections(database_uri, app):
    result = run_flask(database_uri, "shell", stdin=SHELL_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "USERS ['from_shell']" in result.stdout + result.stderr
    assert "MODELS True" in result.stdout + result.stderr
    # The app context popped when the shell ended, so its session released its connection.
    assert "CHECKED_OUT_AT_EXIT 0" in result.stdout + result.stderr


# --- file permissions ----------------------------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int):
    """Run the block under this umask (022, the usual default, makes new files world-readable)."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def sqlite_app(path):
    from chatapp import create_app
    from tests.conftest import base_test_config

    return create_app(base_test_config(f"sqlite:///{path}"))


def dispose(app) -> None:
    with app.app_context():
        db.engine.dispose()


def test_init_db_creates_a_sqlite_database_only_its_owner_can_read(tmp_path):
    path = tmp_path / "new.sqlite"
    app = sqlite_app(path)
    try:
        with umask(0o022):
            result = app.test_cli_runner().invoke(args=["init-db"])
        assert result.exit_code == 0, result.output
        assert mode(path) == 0o600
        # WAL mode: the pool's connections keep the -wal and -shm files, with the file's mode.
        companions = [p for p in (f"{path}-wal", f"{path}-shm") if os.path.exists(p)]
        assert companions
        assert {p: mode(p) for p in companions} == {p: 0o600 for p in companions}
        with unit_of_work(app, write=False) as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(User)) == 0  # the schema is there
    finally:
        dispose(app)


def test_init_db_makes_an_existing_world_readable_database_owner_only(tmp_path, sqlite_template):
    path = tmp_path / "old.sqlite"
    shutil.copyfile(sqlite_template, path)
    os.chmod(path, 0o644)
    app = sqlite_app(path)
    try:
        with umask(0o022):
            result = app.test_cli_runner().invoke(args=["init-db"])
        assert result.exit_code == 0, result.output
        assert mode(path) == 0o600
    finally:
        dispose(app)


def test_a_new_instance_folder_is_owner_only(tmp_path, monkeypatch):
    instance = tmp_path / "instance"
    monkeypatch.setattr("flask.Flask.auto_find_instance_path", lambda self: str(instance))
    with umask(0o022):
        app = sqlite_app(tmp_path / "x.sqlite")
    dispose(app)
    assert app.instance_path == str(instance)
    assert mode(instance) == 0o700
