"""Faults on demand: a connection killed under a session, a COMMIT whose answer is lost.

On PostgreSQL a connection is killed by terminating its backend (pg_terminate_backend;
through PgBouncer, the server connection its transaction runs on, which PgBouncer then
reports to its client as a lost connection);
on SQLite its DBAPI connection is closed under SQLAlchemy. Both report a disconnect.
"""

from __future__ import annotations

import contextlib
import time

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from chatapp.db import db
from tests.support.databases import admin_dsn
from tests.support.pgbouncer import behind_pgbouncer


def kill_connection(connection: sa.Connection) -> None:
    """Make the database connection behind ``connection`` die, as a server restart would."""
    dbapi_connection = connection.connection.dbapi_connection
    if connection.dialect.name == "sqlite":
        dbapi_connection.close()
        return
    if behind_pgbouncer():
        # PgBouncer gives its clients a pid of its own: ask the server connection this
        # transaction runs on (the statement pins it to the transaction, as the next will be).
        pid = dbapi_connection.execute("SELECT pg_backend_pid()").fetchone()[0]
    else:
        pid = dbapi_connection.info.backend_pid
    with psycopg.connect(admin_dsn(connection.engine.url), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s AND datname = current_database()",
            (pid,),
        )
        # Wait until it is gone, so that the next statement fails every time.
        deadline = time.monotonic() + 5
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, f"backend {pid} survived pg_terminate_backend"
            time.sleep(0.01)


class KillAt:
    """A cursor event hook: kills the connection at statements containing ``marker``.

    ``kill_on`` lists which of the matching statements (1 = the first) are killed.
    """

    def __init__(self, marker: str, kill_on=(1,)):
        self.marker = marker
        self.kill_on = set(kill_on)
        self.seen = 0
        self.kills = 0

    def __call__(self, conn, cursor, statement, parameters, context, executemany):
        if self.marker in statement:
            self.seen += 1
            if self.seen in self.kill_on:
                self.kills += 1
                kill_connection(conn)


@contextlib.contextmanager
def hooked(app, event_name: str, hook):
    with app.app_context():
        engine = db.engine
    event.listen(engine, event_name, hook)
    try:
        yield hook
    finally:
        event.remove(engine, event_name, hook)


class CommitFault:
    """Armed by the first transaction that runs ``marker``; acts once, at that transaction's commit."""

    def __init__(self, marker: str):
        self.marker = marker
        self.armed = False
        self.fired = 0

    def saw(self, conn, cursor, statement, parameters, context, executemany):
        if self.marker in statement and not self.fired:
            self.armed = True

    def fire(self) -> bool:
        if not self.armed:
            return False
        self.armed = False
        self.fired += 1
        return True


@contextlib.contextmanager
def commit_answer_lost(app, marker: str):
    """That transaction commits, but its caller hears of a lost connection."""
    fault = CommitFault(marker)
    committed = []

    def note_commit(conn):
        # The connection's COMMIT, not a savepoint's RELEASE (after which the session's
        # after_commit hook runs too).
        committed.append(True)

    def lose_the_answer(session):
        if committed and fault.fire():
            committed.clear()
            raise sa.exc.OperationalError("COMMIT", None, Exception("server closed the connection"))
        committed.clear()

    event.listen(Session, "after_commit", lose_the_answer)
    try:
        with hooked(app, "before_cursor_execute", fault.saw), hooked(app, "commit", note_commit):
            yield fault
    finally:
        event.remove(Session, "after_commit", lose_the_answer)


@contextlib.contextmanager
def killed_at_commit(app, marker: str):
    """That transaction's connection dies as it sends its COMMIT: nothing lands."""
    fault = CommitFault(marker)

    def kill(conn):
        if fault.fire():
            kill_connection(conn)

    with hooked(app, "before_cursor_execute", fault.saw), hooked(app, "commit", kill):
        yield fault
