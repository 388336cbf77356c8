"""The bot is sent the newest part of a conversation within BOT_HISTORY_MAX_CHARS, read
newest first no further back than that, with the system prompt outside the budget."""

import pytest
import sqlalchemy as sa

from chatapp import create_app
from chatapp.auth.models import User
from chatapp.chat import services
from chatapp.chat.history import fit_history
from chatapp.chat.models import Conversation, Message, Role, Status
from chatapp.config import ConfigError
from chatapp.db import db, unit_of_work
from tests.api.test_pipeline import post
from tests.fake_openai import FakeOpenAIServer
from tests.helpers import link_as_one_branch, wait_for_background_work


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def bot(content: str) -> dict:
    return {"role": "assistant", "content": content}


# --- the pure rule -----------------------------------------------------------------------------


def test_everything_is_kept_when_it_fits():
    history = [user("aaaa"), bot("bbbb"), user("cc")]
    assert fit_history(reversed(history), 10) == history


def test_the_oldest_messages_are_dropped_first():
    history = [user("a" * 5), bot("b" * 5), user("c" * 4), bot("d" * 3), user("e" * 2)]
    assert fit_history(reversed(history), 9) == history[-3:]  # 2 + 3 + 4 = 9: exactly full
    assert fit_history(reversed(history), 8) == history[-2:]


def test_taking_stops_at_the_first_message_that_does_not_fit():
    # A short old message after a long one is not sent: the bot never sees a history with holes.
    history = [user("x"), bot("y" * 50), user("question")]
    assert fit_history(reversed(history), 20) == [user("question")]


def test_the_latest_user_message_is_kept_even_over_the_budget():
    history = [user("old"), bot("older answer"), user("q" * 30)]
    assert fit_history(reversed(history), 10) == [user("q" * 30)]
    # Newer assistant messages that do not fit are passed over to reach it.
    assert fit_history(reversed([user("q" * 5), bot("long " * 10)]), 8) == [user("q" * 5)]


def test_the_history_is_read_no_further_than_needed():
    taken = []

    def newest_first():
        for n in range(10_000, 0, -1):
            taken.append(n)
            yield user(f"{n:05d}")

    kept = fit_history(newest_first(), 12)
    assert kept == [user("09999"), user("10000")]
    assert len(taken) == 3  # the two that fit and the one that did not


def test_an_empty_history_is_empty():
    assert fit_history(iter([]), 100) == []


def test_a_budget_below_the_longest_message_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="BOT_HISTORY_MAX_CHARS"):
        create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": "sqlite://", "BOT_HISTORY_MAX_CHARS": 1000})


# --- read from the database --------------------------------------------------------------------


def seed_conversation(app, username: str, contents: list[str]) -> int:
    """A conversation of ``contents``, alternately user and assistant, written in one go."""
    with unit_of_work(app) as session:
        owner_id = session.scalar(sa.select(User.id).where(User.username == username))
        conversation = Conversation(owner_id=owner_id, title="long")
        session.add(conversation)
        session.flush()
        session.execute(
            sa.insert(Message),
            [
                {
                    "conversation_id": conversation.id,
                    "role": Role.USER if n % 2 == 0 else Role.ASSISTANT,
                    "content": content,
                    "status": Status.COMPLETE,
                }
                for n, content in enumerate(contents)
            ],
        )
        link_as_one_branch(session, conversation.id)
        return conversation.id


@pytest.fixture
def history_queries(app):
    """The statements that read a reply's history (newest first, up the reply's branch)."""
    statements = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if "ORDER BY messages.id DESC" in statement and "ancestors" in statement:
            statements.append(statement)

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", record)
    yield statements
    sa.event.remove(engine, "before_cursor_execute", record)


def test_a_long_conversation_sends_its_newest_messages_and_the_system_prompt(app, client, alice, history_queries):
    contents = [f"{n:04d}:" + "x" * 995 for n in range(1000)]  # 1,000 messages of 1,000 characters
    conversation_id = seed_conversation(app, "alice", contents)
    with FakeOpenAIServer("ok") as server:
        app.config.update(
            BOT_ENGINE="openai",
            OPENAI_BASE_URL=server.base_url,
            OPENAI_SYSTEM_PROMPT="You are terse. " * 1000,  # always sent: 15,000 of the budget
            BOT_HISTORY_MAX_CHARS=32_000,
        )
        post(client, alice, f"/api/v1/conversations/{conversation_id}", "the question")
        wait_for_background_work(app)
    sent = server.requests[0]["body"]["messages"]
    assert sent[0] == {"role": "system", "content": "You are terse. " * 1000}
    assert sent[-1] == user("the question")
    # The newest 16 earlier messages fit beside the prompt and the question
    # (15,000 + 16 * 1,000 + 12 <= 32,000), in order.
    assert [m["content"] for m in sent[1:-1]] == contents[-16:]
    assert [m["role"] for m in sent[1:-1]] == ["user", "assistant"] * 8
    # One query, which walked up no further than the budget reached.
    assert len(history_queries) == 1


def test_a_long_history_is_read_whole_or_trimmed_to_the_budget(app, client, alice):
    rows = 107
    contents = [f"message {n}" for n in range(rows)]
    conversation_id = seed_conversation(app, "alice", contents)
    # A pending reply to read the history for, as posting a message leaves it.
    with unit_of_work(app) as session:
        session.add(Message(conversation_id=conversation_id, role=Role.USER, content="now", status=Status.COMPLETE))
        reply = Message(conversation_id=conversation_id, role=Role.ASSISTANT, content="", status=Status.PENDING)
        session.add(reply)
        session.flush()
        reply_id = reply.id
        link_as_one_branch(session, conversation_id)
    with unit_of_work(app, write=False):
        attempt, history = services.reply_history(reply_id, 100_000)
        _attempt, trimmed = services.reply_history(reply_id, len("now") + len("message 999") * 3)
    assert attempt == 0
    assert [m["content"] for m in history] == contents + ["now"]
    assert [m["content"] for m in trimmed] == contents[-3:] + ["now"]
