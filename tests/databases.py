"""Throwaway test databases: a migrated SQLite template, and a PostgreSQL database per run."""

from __future__ import annotations

import os
import secrets
import shutil

import psycopg
import pytest
import sqlalchemy as sa

PG_URL_VAR = "CHATAPP_TEST_DATABASE_URL"


def postgres_base_url() -> str | None:
    return os.environ.get(PG_URL_VAR) or None


def _admin_dsn(url: sa.URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresDatabase:
    """A database created for this run and dropped after it, so parallel runs never collide."""

    def __init__(self, base_url: str):
        self.base = sa.make_url(base_url)
        self.name = f"chatapp_test_{os.getpid()}_{secrets.token_hex(3)}"
        self.url = self.base.set(database=self.name).render_as_string(hide_password=False)

    def create(self) -> None:
        with psycopg.connect(_admin_dsn(self.base), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        with psycopg.connect(_admin_dsn(self.base), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def truncate_all(self, metadata: sa.MetaData) -> None:
        tables = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
        with psycopg.connect(_admin_dsn(sa.make_url(self.url)), autocommit=True) as conn:
            conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")

    def backends_in_state(self, state: str) -> list[tuple]:
        """Other connections to this database in a pg_stat_activity state (e.g. 'idle in transaction')."""
        with psycopg.connect(_admin_dsn(self.base), autocommit=True) as conn:
            return conn.execute(
                "SELECT pid, state, left(query, 200) FROM pg_stat_activity "
                "WHERE datname = %s AND state = %s AND pid <> pg_backend_pid()",
                (self.name, state),
            ).fetchall()

    def connection_count(self) -> int:
        with psycopg.connect(_admin_dsn(self.base), autocommit=True) as conn:
            return conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            ).fetchone()[0]


def require_postgres_or_skip(base_url: str | None) -> None:
    """Skip the PostgreSQL leg when not configured; fail under CI=true if it is unreachable."""
    if base_url is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {PG_URL_VAR} is not set: the PostgreSQL tests must run")
        pytest.skip(f"PostgreSQL tests need {PG_URL_VAR}")
    try:
        psycopg.connect(_admin_dsn(sa.make_url(base_url)), connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {base_url} is unreachable under CI=true: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")


def copy_sqlite(template: str, target: str) -> None:
    shutil.copyfile(template, target)
