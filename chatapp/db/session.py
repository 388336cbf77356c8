"""Sessions: how they end (always, even over a dead connection), the unit of work outside
requests, and how a writer begins. Which request begins how: chatapp.db.policy."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import sqlalchemy as sa
from flask import Flask, current_app, has_app_context
from sqlalchemy.orm import Session

from chatapp.db import sqlite
from chatapp.extensions import db

log = logging.getLogger(__name__)


def begin_write(session: Session | None = None) -> None:
    """Start the session's transaction as a writer.

    On SQLite this is ``BEGIN IMMEDIATE``: the write lock is taken (waiting up to the
    busy timeout) before anything is read, so a transaction never has to upgrade a stale
    read snapshot, which SQLite refuses at once with "database is locked". Before that,
    the writer queues on this process's write gate (``chatapp.db.sqlite``), holding no
    connection, until the writer ahead of it ends its transaction. Elsewhere it just
    begins. Call it before the first query of a unit of work that writes; requests get
    it from their view's ``@transaction`` (chatapp.db.policy).
    """
    session = session if session is not None else db.session()
    if session.in_transaction():
        return
    # On SQLite, queue on this process's write gate first, holding no connection; the
    # gate is left when the transaction ends (chatapp.db.sqlite).
    sqlite.enter_write_gate(session)
    try:
        session.connection(execution_options={sqlite.SQLITE_BEGIN_OPTION: "IMMEDIATE"})
    except BaseException:
        # No connection (pool timeout, connect error) or no BEGIN: the session's
        # transaction may stay open without either, so leave the gate now.
        sqlite.leave_write_gate(session)
        raise


@contextlib.contextmanager
def unit_of_work(app: Flask | None = None, *, write: bool = True) -> Iterator[Session]:
    """Run one unit of work outside a request: its own session, one commit, always removed.

    Pushes an app context of its own (for ``app``, else the current app): Flask-SQLAlchemy
    scopes sessions by app context, so the block's session is never the caller's, and
    removing it leaves a caller's transaction and objects (a request's, a shell's) as they
    were. Commits when the block ends, rolls back if it raises, and always removes the
    session so that its connection goes back to the pool.
    """
    if app is None:
        if not has_app_context():
            raise RuntimeError("unit_of_work() needs an app context or an app to push one for")
        app = current_app._get_current_object()  # type: ignore[attr-defined]
    with app.app_context():
        session = db.session()
        try:
            if write:
                begin_write(session)
            yield session
            session.commit()
        finally:
            # Closing rolls back whatever was not committed (the block raised, or the
            # commit failed), and survives a connection that died meanwhile.
            remove_session()


def remove_session() -> None:
    """End the current scope's session and give back its connection, even a dead one.

    Closing a session rolls its transaction back. When the connection died while the
    session held it (the server restarted, the backend was terminated, the network
    dropped), that rollback raises, though the transaction died with the connection,
    and ``scoped_session.remove()`` then leaves the session in the registry.
    """
    session = db.session.registry() if db.session.registry.has() else None
    try:
        db.session.remove()
    except sa.exc.DBAPIError as exc:
        # The connection is back in the pool either way: invalidated if this was a
        # disconnect (the pool opens a new one next time), else reset or discarded
        # by the pool's own rollback on return.
        log.warning("ended a session whose database connection had failed: %s", exc.orig)
    finally:
        db.session.registry.clear()
        if session is not None:
            # A close that raised skipped after_transaction_end: never keep the gate.
            sqlite.leave_write_gate(session)
