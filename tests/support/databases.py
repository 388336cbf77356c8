"""Throwaway databases for tests and benchmarks, and reading what a server stored.

A PostgreSQL database is created for one run, under a name no other run uses, and dropped
after it ``WITH (FORCE)``; the shared PostgreSQL server itself is never touched otherwise.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.support import pgbouncer

ROOT = Path(__file__).resolve().parents[2]
TEST_URL_VAR = "CHATAPP_TEST_DATABASE_URL"
# Servers and commands run without TESTING, so they need a key the start-up check accepts
# (32 bytes or more). A fixed one: every test server signs with the same key.
SECRET_KEY = "chatapp-test-servers-only-0123456789abcdef"


def postgres_base_url(*env_vars: str, default: str | None = None) -> str | None:
    """The first of ``env_vars`` that is set (CHATAPP_TEST_DATABASE_URL when none are named)."""
    for name in env_vars or (TEST_URL_VAR,):
        if os.environ.get(name):
            return os.environ[name]
    return default


def admin_dsn(url: str | sa.URL) -> str:
    """A psycopg connection string for a SQLAlchemy URL (``postgresql+psycopg://...``), to
    the PostgreSQL server itself even when ``url`` goes through a test PgBouncer (which
    would give its pid, not the server's, and pool its statements with others)."""
    return pgbouncer.direct(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_unreachable(base_url: str, timeout: int = 5) -> str | None:
    """Why the PostgreSQL server at ``base_url`` cannot be reached, or None when it can."""
    try:
        psycopg.connect(admin_dsn(base_url), connect_timeout=timeout).close()
    except psycopg.OperationalError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


class PostgresDatabase:
    """A database created for this run and dropped after it, so parallel runs never collide.

    ``url`` is what the apps connect to: the server, or a PgBouncer in front of it
    (``route_through``); the statements about the database itself go to the server.
    """

    def __init__(self, base_url: str, prefix: str = "chatapp_test"):
        self.base = sa.make_url(base_url)
        self.name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
        self.url = self.base.set(database=self.name).render_as_string(hide_password=False)
        self.dropped = False
        self.bouncer: pgbouncer.PgBouncer | None = None

    def route_through(self, bouncer: pgbouncer.PgBouncer) -> None:
        """Let the apps reach this database through ``bouncer``."""
        self.url = bouncer.url_for(self.url)
        self.bouncer = bouncer

    def _admin(self, **kwargs) -> psycopg.Connection:
        """A connection to the server's own database (the base URL's), for statements about this one."""
        return psycopg.connect(admin_dsn(self.base), autocommit=True, connect_timeout=5, **kwargs)

    def create(self) -> None:
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        if self.dropped:
            return
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.dropped = True

    def truncate_all(self, metadata: sa.MetaData) -> None:
        tables = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
        with psycopg.connect(admin_dsn(self.url), autocommit=True) as conn:
            conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")

    def backends_in_state(self, state: str) -> list[tuple]:
        """Other connections to this database in a pg_stat_activity state (e.g. 'idle in transaction')."""
        with self._admin() as conn:
            return conn.execute(
                "SELECT pid, state, left(query, 200) FROM pg_stat_activity "
                "WHERE datname = %s AND state = %s AND pid <> pg_backend_pid()",
                (self.name, state),
            ).fetchall()

    def states(self) -> dict[str, int]:
        """How many connections to this database are in each pg_stat_activity state."""
        with self._admin() as conn:
            rows = conn.execute(
                "SELECT coalesce(state, '?'), count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid() GROUP BY 1",
                (self.name,),
            ).fetchall()
        return dict(rows)

    def connection_count(self) -> int:
        return sum(self.states().values())

    def terminate_backends(self) -> list[str]:
        """pg_terminate_backend on every connection to this database; the states they were in."""
        with self._admin() as conn:
            rows = conn.execute(
                "SELECT state, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            ).fetchall()
        return [state for state, _ in rows]


def migrate(database_uri: str) -> None:
    """Bring a database to the latest schema with the real CLI (``flask init-db``)."""
    env = {**os.environ, "CHATAPP_SQLALCHEMY_DATABASE_URI": database_uri, "CHATAPP_SECRET_KEY": SECRET_KEY}
    subprocess.run(
        [sys.executable, "-m", "flask", "--app", "chatapp", "init-db"],
        env=env,
        check=True,
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )


def copy_sqlite(template: str, target: str) -> None:
    shutil.copyfile(template, target)


# --- what a server stored ------------------------------------------------------------------


@contextlib.contextmanager
def inspect_db(uri: str):
    """A session on the database straight, not through the app (or a proxy in front of it)."""
    engine = sa.create_engine(pgbouncer.direct(uri) if uri.startswith("postgresql") else uri)
    try:
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()


def stored_messages(uri: str) -> dict:
    """Every message row, by id, detached from its session."""
    from chatapp.chat.models import Message

    with inspect_db(uri) as session:
        rows = session.scalars(sa.select(Message)).all()
        session.expunge_all()
    return {row.id: row for row in rows}


def active_replies(uri: str) -> int:
    """How many replies are pending or streaming."""
    from chatapp.chat.models import Message, Status

    with inspect_db(uri) as session:
        return session.scalar(
            sa.select(sa.func.count())
            .select_from(Message)
            .where(Message.status.in_([Status.PENDING, Status.STREAMING]))
        )


def describe_active_replies(uri: str) -> list[tuple]:
    """(id, status, length of the text, updated_at) of the replies pending or streaming."""
    from chatapp.chat.models import Message, Status

    with inspect_db(uri) as session:
        return session.execute(
            sa.select(Message.id, Message.status, sa.func.length(Message.content), Message.updated_at).where(
                Message.status.in_([Status.PENDING, Status.STREAMING])
            )
        ).all()


def busiest_worker(uri: str, pids: list[int]) -> int:
    """Of ``pids``, the process holding the leases of the most replies in progress (a lease
    owner is "host:pid:nonce"); the first pid when none holds any."""
    from chatapp.chat.models import Message, Status

    with inspect_db(uri) as session:
        owners = session.scalars(
            sa.select(Message.lease_owner).where(
                Message.status.in_([Status.PENDING, Status.STREAMING]), Message.lease_owner.is_not(None)
            )
        ).all()
    held = {pid: sum(1 for owner in owners if owner.split(":")[1] == str(pid)) for pid in pids}
    return max(pids, key=lambda pid: held[pid])
