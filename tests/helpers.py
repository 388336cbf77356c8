"""Assertions and actions shared by the tests."""

from __future__ import annotations

import contextlib
import re
import threading

from flask import Flask

from chatapp.auth.models import User
from chatapp.db import db, sqlite, unit_of_work


def start_conversation(browser) -> int:
    """A new, empty conversation of a logged-in test client, started as the page script does:
    the API, with the login cookie and the CSRF token of a page."""
    page = browser.get("/").get_data(as_text=True)
    token = re.search(r'<meta name="csrf-token" content="([^"]+)">', page).group(1)
    response = browser.post("/api/v1/conversations", json={}, headers={"X-CSRFToken": token})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["id"]


def checked_out(app: Flask) -> int:
    with app.app_context():
        total = sum(engine.pool.checkedout() for engine in db.engines.values())
    return total


def live_sessions() -> int:
    """Sessions currently held by the registry, across every scope (thread, app context)."""
    return len(db.session.registry.registry)


def wait_for_background_work(app: Flask, timeout: float = 30.0) -> None:
    runner = app.extensions.get("chatapp.reply_runner")
    if runner is not None:
        assert runner.wait_idle(timeout), "reply runner still busy after the test"


def assert_no_leaks(app: Flask) -> None:
    assert live_sessions() == 0, f"session registry still holds {live_sessions()} session(s)"
    assert checked_out(app) == 0, f"{checked_out(app)} connection(s) still checked out"


class AuthActions:
    """Registers users and gets API tokens through the public API."""

    def __init__(self, client):
        self._client = client

    def register(self, username: str = "alice", password: str = "correct horse") -> dict:
        response = self._client.post("/api/v1/users", json={"username": username, "password": password})
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    def token(self, username: str = "alice", password: str = "correct horse") -> str:
        response = self._client.post("/api/v1/tokens", json={"username": username, "password": password})
        assert response.status_code == 201, response.get_json()
        return response.get_json()["token"]

    def headers(self, username: str = "alice", password: str = "correct horse") -> dict:
        self.register(username, password)
        return {"Authorization": f"Bearer {self.token(username, password)}"}


@contextlib.contextmanager
def writer_holding_the_gate(app, username: str = "holder"):
    """A thread inside a write transaction (an insert, not committed) until the block ends."""
    holding, done, errors = threading.Event(), threading.Event(), []

    def hold():
        try:
            with unit_of_work(app) as session:
                session.add(User(username=username, password_hash="x"))
                session.flush()
                holding.set()
                assert done.wait(30), "the test never let the holder go"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            holding.set()

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10) and not errors, errors
    try:
        yield
    finally:
        done.set()
        thread.join(30)
        assert not thread.is_alive() and not errors, errors


def transaction_state() -> dict:
    """What the request holds right now: an open transaction, SQLite's write gate, connections."""
    session = db.session() if db.session.registry.has() else None
    return {
        "in_transaction": session is not None and session.in_transaction(),
        "holds_gate": session is not None and sqlite._WRITE_GATE_KEY in session.info,
        "checked_out": sum(engine.pool.checkedout() for engine in db.engines.values()),
    }


NOTHING_HELD = {"in_transaction": False, "holds_gate": False, "checked_out": 0}


def link_as_one_branch(session, conversation_id: int) -> None:
    """Make a conversation's messages, written without parents, one branch in id order
    (each follows the one before it), ending at the last: what posting them would have made."""
    import sqlalchemy as sa

    from chatapp.chat.models import Conversation, Message

    ids = session.scalars(sa.select(Message.id).where(Message.conversation_id == conversation_id).order_by(Message.id))
    previous = None
    for message_id in ids:
        session.execute(sa.update(Message).where(Message.id == message_id).values(parent_id=previous))
        previous = message_id
    session.execute(sa.update(Conversation).where(Conversation.id == conversation_id).values(current_leaf_id=previous))


def run_reply_again(app: Flask, reply_id: int) -> None:
    """Start a finished reply over as its next attempt, as a takeover after its process
    died does (regenerating now adds a new version instead): text emptied, pending, run."""
    import sqlalchemy as sa

    from chatapp.chat.models import Message, Status
    from chatapp.chat.runner import commit_and_start_reply, get_runner
    from chatapp.db import begin_write

    with app.test_request_context(), get_runner(app).reserve() as reservation:
        begin_write()
        attempt = db.session.scalar(sa.select(Message.attempt).where(Message.id == reply_id)) + 1
        db.session.execute(
            sa.update(Message)
            .where(Message.id == reply_id)
            .values(content="", status=Status.PENDING, attempt=attempt, lease_owner=None, runs=0)
        )
        commit_and_start_reply(app, reply_id, attempt, reservation)
