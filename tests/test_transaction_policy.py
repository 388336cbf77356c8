"""The transaction policy (chatapp.db.policy): every view declares its intent, writers
begin after authentication and parsing, and nothing renders inside a transaction."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from flask import Blueprint
from flask.cli import shell_command

from chatapp import create_app
from chatapp.auth.models import User
from chatapp.chat.models import Conversation
from chatapp.db import begin_write, db, policy, transaction, unit_of_work
from chatapp.errors import handlers
from tests.conftest import base_test_config
from tests.helpers import NOTHING_HELD, checked_out, transaction_state, writer_holding_the_gate

# A writer ahead would keep a request that waits for the lock this long: far more than
# any request that does not wait needs.
LONG_BUSY = {"SQLITE_BUSY_TIMEOUT_MS": 5000}
PROMPT_SECONDS = 2.0


def count(app, model) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model))


# --- every view declares its intent, innermost -------------------------------------------


def test_every_chatapp_view_declares_its_intent_innermost(app):
    intents = {
        endpoint: policy.declared_intent(view)
        for endpoint, view in app.view_functions.items()
        if view.__module__.startswith("chatapp.")
    }
    assert intents and None not in intents.values(), intents
    assert intents["messages.post_message"] == "write"
    assert intents["messages.list_messages"] == "read"
    assert intents["web.login"] == "write-after"


def test_an_app_with_an_undeclared_view_does_not_start(database_uri, monkeypatch):
    undeclared = Blueprint("undeclared", "chatapp.undeclared")

    @undeclared.post("/undeclared")
    def forgot():
        """A view that says nothing about its transaction."""
        return ""

    forgot.__module__ = "chatapp.undeclared"
    original = policy.check_views

    def register_then_check(app):
        app.register_blueprint(undeclared)
        original(app)

    monkeypatch.setattr(policy, "check_views", register_then_check)
    with pytest.raises(RuntimeError, match="undeclared.forgot"):
        create_app(base_test_config(database_uri))


def test_a_declaration_under_another_decorator_is_not_innermost():
    def outer(view):
        def wrapper(*args, **kwargs):
            return view(*args, **kwargs)

        wrapper.__wrapped__ = view
        return wrapper

    def view():
        """Nothing."""

    assert policy.declared_intent(transaction("read")(outer(view))) is None
    assert policy.declared_intent(outer(transaction("read")(view))) == "read"
    with pytest.raises(ValueError, match="intent"):
        transaction("writes")


probe = Blueprint("probe", __name__)


@probe.post("/probe/read-that-writes")
@transaction("read")
def read_that_writes():
    """Declared a reader, but adds a user."""
    db.session.add(User(username="sneaky", password_hash="x"))
    db.session.flush()
    return "", 201


@probe.post("/probe/write-after/<int:begins>")
@transaction("write-after")
def write_after(begins):
    """Updates users, beginning as a writer first only if told to."""
    if begins:
        begin_write()
    db.session.execute(sa.update(User).values(password_hash="y"))
    return "", 201


@pytest.mark.parametrize("backend", ["sqlite"])
def test_on_sqlite_a_view_that_writes_without_beginning_as_a_writer_fails_at_once(app):
    app.register_blueprint(probe)
    client = app.test_client()
    with pytest.raises(RuntimeError, match="'read' view wrote without beginning as a writer"):
        client.post("/probe/read-that-writes")
    with pytest.raises(RuntimeError, match="'write-after' view wrote"):
        client.post("/probe/write-after/0")
    assert client.post("/probe/write-after/1").status_code == 201
    assert count(app, User) == 0


# --- refused requests never wait for the write lock ----------------------------------------


@pytest.mark.parametrize("extra_config", [LONG_BUSY], indirect=True)
def test_unauthenticated_and_invalid_api_posts_answer_without_waiting_for_a_writer(app, client, auth):
    headers = auth.headers()
    conversation_id = client.post("/api/v1/conversations", json={}, headers=headers).get_json()["id"]
    conversations = count(app, Conversation)
    refused = [
        # No credentials, a revoked-looking token, a body that fails validation.
        (
            lambda: client.post("/api/v1/conversations", json={"title": "x"}, headers={"Authorization": "Bearer nope"}),
            401,
        ),
        (lambda: app.test_client().post("/api/v1/conversations", json={"title": "x"}), 401),
        (lambda: client.post("/api/v1/conversations", json={"title": ""}, headers=headers), 422),
        (
            lambda: client.post(
                f"/api/v1/conversations/{conversation_id}/messages", json={"content": "   "}, headers=headers
            ),
            422,
        ),
        (
            lambda: client.post(
                f"/api/v1/conversations/{conversation_id}/messages",
                json={"content": "hi"},
                headers={**headers, "Idempotency-Key": "é"},
            ),
            422,
        ),
        (lambda: app.test_client().delete("/api/v1/login-sessions"), 401),
    ]
    with writer_holding_the_gate(app):
        for send, expected in refused:
            started = time.monotonic()
            response = send()
            waited = time.monotonic() - started
            assert response.status_code == expected, response.get_data(as_text=True)
            assert waited < PROMPT_SECONDS, f"{response.status_code} after {waited:.1f} s"
    assert count(app, Conversation) == conversations


# --- nothing is answered inside a transaction -------------------------------------------


def test_api_errors_answer_after_the_transaction_ended(app, client, auth, monkeypatch):
    headers = auth.headers()
    states = []
    jsonify = handlers.jsonify

    def recording_jsonify(*args, **kwargs):
        states.append(transaction_state())
        return jsonify(*args, **kwargs)

    monkeypatch.setattr(handlers, "jsonify", recording_jsonify)
    response = client.post("/api/v1/conversations/999999/messages/1/stop", headers=headers)
    assert response.status_code == 404
    assert states == [NOTHING_HELD]


# --- unit_of_work has a session of its own --------------------------------------------------


@pytest.mark.parametrize("pass_app", [True, False])
def test_unit_of_work_inside_an_app_context_leaves_the_callers_session_alone(app, pass_app):
    with unit_of_work(app) as session:
        session.add(User(username="caller", password_hash="x"))
    with app.app_context():
        caller = db.session()
        user = caller.scalar(sa.select(User).where(User.username == "caller"))
        with unit_of_work(app if pass_app else None) as session:
            assert session is not caller
            session.add(User(username="inner", password_hash="x"))
        # The caller's session, transaction and objects are as they were.
        assert db.session() is caller
        assert caller.in_transaction()
        assert user in caller and user.username == "caller"
        caller.rollback()
    assert checked_out(app) == 0
    with unit_of_work(app, write=False) as session:
        assert sorted(session.scalars(sa.select(User.username))) == ["caller", "inner"]


# --- the shell ------------------------------------------------------------------------------


def test_the_shell_says_its_session_holds_a_transaction_until_commit_or_rollback(app, runner):
    script = (
        "db.session.execute(sa.text('SELECT 1'))\nprint('OPEN', db.session().in_transaction())\ndb.session.rollback()\n"
    )
    result = runner.invoke(shell_command, input=script)
    assert result.exit_code == 0, result.output
    assert "OPEN True" in result.output
    note = " ".join(result.output.split())
    assert "holds it" in note and "idle in transaction" in note
    assert "db.session.commit() or db.session.rollback()" in note
