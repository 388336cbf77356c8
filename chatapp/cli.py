"""Maintainer commands: init-db, create-user, create-token, and the shell's preloaded names."""

from __future__ import annotations

import contextlib
import os
import sys

import click
import sqlalchemy as sa
from flask import Flask, current_app
from flask.cli import with_appcontext

from chatapp.auth import services as auth
from chatapp.db import db, schema, unit_of_work
from chatapp.errors import AppError


def init_app(app: Flask) -> None:
    app.cli.add_command(init_db_command)
    app.cli.add_command(create_user_command)
    app.cli.add_command(create_token_command)
    app.shell_context_processor(shell_context)


# Flask's shell prints its own banner after the context is made; this note comes first.
SHELL_NOTE = (
    "chatapp: db.session opens a transaction at its first query and holds it (and its\n"
    "locks; PostgreSQL shows it 'idle in transaction', SQLite may keep writers waiting)\n"
    "until you call db.session.commit() or db.session.rollback(). End each piece of work\n"
    "with one of them."
)


def shell_context() -> dict:
    """The names ``flask shell`` preloads; says first how long the shell's session holds a transaction."""
    from chatapp import models

    click.echo(SHELL_NOTE, err=True)
    names = {name: getattr(models, name) for name in models.__all__}
    return {"db": db, "sa": sa, **names}


def _require_schema() -> None:
    try:
        current = schema.schema_is_current()
    except sa.exc.OperationalError as exc:
        raise click.ClickException(f"cannot reach the database: {exc.orig}") from None
    if not current:
        raise click.ClickException(
            "the database is not initialised or not up to date; run: flask --app chatapp init-db"
        )


def _sqlite_files() -> list[str]:
    """The paths of the SQLite database files this app uses (none for PostgreSQL or memory)."""
    paths = []
    for engine in db.engines.values():
        url = engine.url
        database = url.database or ""
        if url.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
            continue
        paths.append(database)
    return paths


def _create_owner_only(path: str) -> None:
    """Create an empty database file readable by its owner only, before SQLite creates it
    with the umask's mode (usually world-readable); SQLite gives its -wal and -shm files the
    database file's mode, so they are born owner-only too."""
    if os.path.isdir(os.path.dirname(path) or "."):
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _restrict_to_owner(path: str) -> None:
    """chmod 0600 a database file made before init-db did this, and its companion files."""
    for name in (path, f"{path}-wal", f"{path}-shm", f"{path}-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(name, 0o600)


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create the schema or upgrade it to the latest migration (safe to repeat).

    A SQLite database holds password hashes and every conversation: its file is made
    readable by its owner only (0600).
    """
    sqlite_files = _sqlite_files()
    for path in sqlite_files:
        _create_owner_only(path)
    try:
        schema.upgrade_to_latest()
    except sa.exc.OperationalError as exc:
        raise click.ClickException(f"cannot reach the database: {exc.orig}") from None
    finally:
        db.session.remove()
    for path in sqlite_files:
        _restrict_to_owner(path)
    click.echo("Database is at the latest schema.")


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@click.command("create-user")
@with_appcontext
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def create_user_command(username: str, password_stdin: bool) -> None:
    """Create a user; the password is prompted for, or read with --password-stdin."""
    _require_schema()
    password = _read_password(password_stdin)
    try:
        user = auth.new_user(username, password)  # hash before the unit of work begins
        with unit_of_work(current_app._get_current_object()):  # type: ignore[attr-defined]  # LocalProxy method
            user_id = auth.add_user(user).id
    except AppError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"Created user {username!r} (id {user_id}).")


@click.command("create-token")
@with_appcontext
@click.argument("username")
@click.option("--name", default="cli", show_default=True, help="A label for the token.")
def create_token_command(username: str, name: str) -> None:
    """Create an API token for a user and print it (it is shown only this once)."""
    _require_schema()
    with unit_of_work(current_app._get_current_object()):  # type: ignore[attr-defined]  # LocalProxy method
        user = auth.find_user(username)
        if user is None:
            raise click.ClickException(f"no user named {username!r}; create it with create-user")
        _row, token = auth.create_token(user.id, name=name)
    click.echo(token)
