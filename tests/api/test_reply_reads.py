"""The statements the reply path reads with, counted on each database: a reply worker's claim
(the lease, the conversation's settings and the history) and a message's list of versions.
Counts and results both: fewer statements, the same answers."""

from __future__ import annotations

import contextlib

import sqlalchemy as sa

from chatapp.auth import services as auth_services
from chatapp.chat import reply_store
from chatapp.chat import services as chat_services
from chatapp.chat.conversation_settings import ReplySettings
from chatapp.db import db, unit_of_work

DATA = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")


@contextlib.contextmanager
def data_statements(app):
    """The SQL statements that read or write rows while the block runs (not BEGIN and the like)."""
    with app.app_context():
        engine = db.engine
    seen: list[str] = []

    def record(_connection, _cursor, statement, _parameters, _context, _executemany):
        if statement.lstrip().upper().startswith(DATA):
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def conversation_with_a_pending_reply(app) -> tuple[int, int, int]:
    """One finished exchange, then a question whose reply waits: (conversation, first message, reply)."""
    with unit_of_work(app):
        user = auth_services.create_user("carol", "correct horse")
        conversation = chat_services.create_conversation(user.id, system_prompt="Answer in one line.")
        first, reply = chat_services.post_message(conversation, "first question")
        chat_services.finish_reply(reply.id, reply.attempt, "first answer", None)
        _question, pending = chat_services.post_message(conversation, "second question")
        return conversation.id, first.id, pending.id


def test_claiming_a_reply_reads_its_settings_and_history_in_two_statements(app):
    conversation_id, _first, reply_id = conversation_with_a_pending_reply(app)
    with data_statements(app) as seen:
        claimed = reply_store.claim_reply(app, reply_id, "host:1:a")
    assert claimed == (
        0,
        [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"},
        ],
        ReplySettings(conversation_id, "echo", "Answer in one line.", needs_title=True),
    )
    # The claim returns the conversation's settings; the history is one more query.
    assert len(seen) == 2, seen
    # Held by that worker: another's claim is one statement that takes nothing.
    with data_statements(app) as seen:
        assert reply_store.claim_reply(app, reply_id, "host:2:b") is None
    assert len(seen) == 1, seen


def test_a_claim_records_the_conversations_model_and_reads_it_back(app):
    conversation_id, _first, reply_id = conversation_with_a_pending_reply(app)
    with unit_of_work(app) as session:
        session.execute(
            sa.update(chat_services.Conversation)
            .where(chat_services.Conversation.id == conversation_id)
            .values(model="other-model", title_source="user")
        )
    _attempt, _history, settings = reply_store.claim_reply(app, reply_id, "host:1:a")
    assert settings == ReplySettings(conversation_id, "other-model", "Answer in one line.", needs_title=False)
    with unit_of_work(app, write=False) as session:
        assert session.get(chat_services.Message, reply_id).model == "other-model"


def test_the_versions_of_a_message_take_two_statements(app):
    conversation_id, first, reply_id = conversation_with_a_pending_reply(app)
    with unit_of_work(app):
        chat_services.finish_reply(reply_id, 0, "second answer", None)  # one reply at a time
        second, _reply = chat_services.edit_message(conversation_id, first, "first question, again")
        second_id = second.id
    with app.test_request_context(), data_statements(app) as seen:
        versions = chat_services.list_siblings(conversation_id, second_id)
        db.session.rollback()
    assert len(seen) == 2, seen  # the message, then its versions with their places among them
    assert [(v.id, v.content, v.siblings) for v in versions] == [
        (first, "first question", {"count": 2, "index": 1, "next_id": second_id, "previous_id": None}),
        (second_id, "first question, again", {"count": 2, "index": 2, "next_id": None, "previous_id": first}),
    ]
