"""Concurrent writers on SQLite: no "database is locked", no lost update."""

import os
import threading
import time

import pytest
import sqlalchemy as sa

from chatapp import create_app
from chatapp.auth.models import User
from chatapp.chat.models import Conversation, Message, Role, Status
from chatapp.db import db, unit_of_work
from tests.conftest import base_test_config

WRITERS = 16
SECONDS = float(os.environ.get("CHATAPP_SQLITE_WRITERS_SECONDS", "30"))


@pytest.fixture
def sqlite_app(sqlite_template, tmp_path):
    import shutil

    path = tmp_path / "writers.sqlite"
    shutil.copyfile(sqlite_template, path)
    config = base_test_config(f"sqlite:///{path}")
    config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": WRITERS, "max_overflow": 0, "pool_timeout": 30}
    app = create_app(config)
    with unit_of_work(app) as session:
        user = User(username="writer", password_hash="x")
        session.add(user)
        session.flush()
        conversation = Conversation(owner_id=user.id, title="shared")
        session.add(conversation)
        session.flush()
        tally = Message(conversation_id=conversation.id, role=Role.ASSISTANT, content="", status=Status.STREAMING)
        session.add(tally)
        session.flush()
        app.config["IDS"] = (conversation.id, tally.id)
    yield app
    with app.app_context():
        db.engine.dispose()


def hammer(app, seconds: float, write: bool) -> tuple[int, list[str]]:
    """WRITERS threads each read, then write, in one transaction, for `seconds`."""
    conversation_id, tally_id = app.config["IDS"]
    committed, errors, lock = [0], [], threading.Lock()
    deadline = time.monotonic() + seconds

    def writer(number: int):
        while time.monotonic() < deadline:
            try:
                with unit_of_work(app, write=write) as session:
                    # Read first: a deferred transaction would have to upgrade this snapshot.
                    session.scalar(sa.select(sa.func.max(Message.id)).where(Message.conversation_id == conversation_id))
                    session.add(Message(conversation_id=conversation_id, role=Role.USER, content=f"w{number}"))
                    session.execute(
                        sa.update(Message).where(Message.id == tally_id).values(content=Message.content + "x")
                    )
                with lock:
                    committed[0] += 1
            except sa.exc.OperationalError as exc:
                with lock:
                    errors.append(str(exc.orig))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    return committed[0], errors


@pytest.mark.slow
def test_sixteen_writers_never_see_database_is_locked_and_lose_nothing(sqlite_app):
    committed, errors = hammer(sqlite_app, SECONDS, write=True)
    assert errors == []
    assert committed > 0
    conversation_id, tally_id = sqlite_app.config["IDS"]
    with unit_of_work(sqlite_app, write=False) as session:
        stored = session.scalar(
            sa.select(sa.func.count()).where(Message.conversation_id == conversation_id, Message.role == Role.USER)
        )
        tally = session.get(Message, tally_id).content
    assert stored == committed
    assert len(tally) == committed  # every read-modify-write landed: no lost update


def test_control_deferred_transactions_do_hit_database_is_locked(sqlite_app):
    """Shows the test above can fail: without BEGIN IMMEDIATE, SQLite refuses snapshot upgrades."""
    sqlite_app.config["SQLITE_BUSY_TIMEOUT_MS"] = 10_000
    committed, errors = hammer(sqlite_app, 3, write=False)
    assert any("database is locked" in error for error in errors)
