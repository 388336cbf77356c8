"""The transaction policy: how every request's database transaction begins and ends.

Each view declares what it does with the database, at its definition, with
``@transaction(...)`` as its innermost decorator (directly on the function)::

    @blp.post("/conversations")
    @blp.arguments(ConversationIn)
    @blp.response(201, ConversationOut)
    @transaction("write")
    def create_conversation(body): ...

Innermost, because everything outside it runs first and must hold no write lock:
authentication (the API blueprints' ``require_user``, Flask-Login's ``login_required``),
CSRF checks, rate limits and body parsing (flask-smorest's ``@blp.arguments`` answers 422
before the view runs). ``check_views`` refuses to start an app with a view that does
not declare its intent this way, and on SQLite a view that writes without having begun
as a writer fails at once (RuntimeError) instead of now and then with "database is locked".

How it begins, by intent:

- ``"read"``: the view only reads. Its transaction begins at its first query as a plain
  ``BEGIN`` (on SQLite a reader, which never waits for a writer), continuing the read
  authentication made.
- ``"write"``: the view writes. When it starts, the read authentication made is committed
  (nothing to keep) and the transaction begins as a writer (``begin_write``: on SQLite,
  queue on this process's write gate, then ``BEGIN IMMEDIATE``), before the view's first
  read, so it never has to upgrade a stale read snapshot ("database is locked").
- ``"write-after"``: the view writes after work that must hold nothing: hashing a
  password, validating a form it re-renders when invalid. It starts with no transaction,
  ends any read it makes before the slow part, and calls ``begin_write()`` at the one
  line where its write begins; an invalid form or a wrong password never waits for the
  write lock.
- ``"none"``: the view uses no request session (a probe, the metrics page).

How it ends. Services add and flush; the view is the one commit boundary. When a
writing view returns, whatever is still open is committed: the write of a view that had
nothing to do after it, or a read it made since (objects stay loaded,
``expire_on_commit=False``, for flask-smorest to serialize). When a reading view
returns, its session is ended: a rollback loses nothing, and a connection that died
meanwhile does not turn its answer into an error. A view commits earlier itself when
something must follow the commit: starting or cancelling a reply, logging out,
rendering a page. When a view raises, its session is ended (rolled back, connection
returned) before any error page renders; the error handlers and form re-renders end it
too, so no page ever renders holding a transaction, let alone the write lock. Pages are
built from data loaded first; the transaction ends, then the template and its Markdown
render (``chatapp.web.pages.render_page``).

Work outside requests (threads, CLI commands, stream polls) uses ``unit_of_work()``,
which has a session of its own. After-request hooks that stamp "last used" times write
in their own short transaction after the view's has ended. ``flask shell`` has no view:
its session holds a transaction from its first query until ``db.session.commit()`` or
``rollback()``, as the shell says when it starts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

from flask import Flask
from sqlalchemy import event
from sqlalchemy.orm import Session

from chatapp.db import sqlite
from chatapp.db.session import begin_write, remove_session
from chatapp.extensions import db

Intent = Literal["read", "write", "write-after", "none"]
INTENTS = ("read", "write", "write-after", "none")
# session.info key: the intent of the view running on this session, while it runs.
_VIEW_INTENT_KEY = "chatapp_view_intent"


def transaction(intent: Intent) -> Callable:
    """Declare how the view uses the database; put it innermost, directly on the function."""
    if intent not in INTENTS:
        raise ValueError(f"transaction intent must be one of {INTENTS}, not {intent!r}")

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def run_in_transaction(*args, **kwargs):
            try:
                if intent != "read":
                    # Authentication's read is over: a writer begins afresh (SQLite cannot
                    # upgrade a read snapshot), and the others hold nothing while they run.
                    end_transaction()
                if intent == "write":
                    begin_write()
                if intent != "none":
                    db.session().info[_VIEW_INTENT_KEY] = intent
                result = view(*args, **kwargs)
                if intent in ("read", "none"):
                    # A read loses nothing to a rollback, nor to a connection that died
                    # since: its answer stands. Loaded objects stay loaded (detached).
                    remove_session()
                else:
                    end_transaction()
            except BaseException:
                # Before any error page renders; survives a connection that died.
                remove_session()
                raise
            finally:
                if db.session.registry.has():
                    db.session().info.pop(_VIEW_INTENT_KEY, None)
            return result

        run_in_transaction.transaction_intent = intent  # type: ignore[attr-defined]
        return run_in_transaction

    return decorate


@event.listens_for(Session, "before_flush")
def _flush_needs_a_writer(session: Session, flush_context, instances) -> None:
    _refuse_a_write_outside_the_gate(session)


@event.listens_for(Session, "do_orm_execute")
def _statement_needs_a_writer(state) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        _refuse_a_write_outside_the_gate(state.session)


def _refuse_a_write_outside_the_gate(session: Session) -> None:
    # On SQLite a write in a transaction that began as a reader fails with "database is
    # locked" as soon as another writer got in first: say so at once, in every test.
    intent = session.info.get(_VIEW_INTENT_KEY)
    if intent is not None and sqlite.needs_write_gate(session):
        raise RuntimeError(
            f'a {intent!r} view wrote without beginning as a writer: declare it "write", '
            'or call begin_write() before the write of a "write-after" view'
        )


def end_transaction() -> None:
    """Commit whatever the session has open (a read has nothing to commit) and give back its connection.

    Loaded objects stay loaded (``expire_on_commit=False``): rendering or serializing
    them afterwards runs no SQL.
    """
    if db.session.registry.has() and db.session().in_transaction():
        db.session.commit()


def declared_intent(view: Callable) -> str | None:
    """The intent ``@transaction`` declared on ``view``, if it is the innermost decorator."""
    wrappers = [view]
    while hasattr(wrappers[-1], "__wrapped__"):
        wrappers.append(wrappers[-1].__wrapped__)
    if len(wrappers) < 2 or wrappers[-2].__code__ is not _WRAPPER_CODE:
        return None
    return wrappers[-2].transaction_intent  # type: ignore[attr-defined]


def check_views(app: Flask) -> None:
    """Refuse an app with a chatapp view that does not declare its intent innermost."""
    missing = [
        endpoint
        for endpoint, view in app.view_functions.items()
        if _defined_in_chatapp(view) and declared_intent(view) is None
    ]
    if missing:
        raise RuntimeError(
            "views without @transaction(...) as their innermost decorator: " + ", ".join(sorted(missing))
        )


def _defined_in_chatapp(view: Callable) -> bool:
    # Flask's static files and flask-smorest's OpenAPI document touch no database.
    return getattr(view, "__module__", "").startswith("chatapp.")


_WRAPPER_CODE = transaction("none")(lambda: None).__code__
