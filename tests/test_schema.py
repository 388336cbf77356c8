"""Migrations, models and database-level rules."""

import flask_migrate
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from chatapp.auth.models import ApiToken, LoginSession, User
from chatapp.chat.models import Conversation, Message, Role, Status
from chatapp.chat.sweeper import sweep_once
from chatapp.db import Base, db, unit_of_work, utcnow
from chatapp.db.schema import upgrade_to_latest
from chatapp.extensions import MIGRATIONS_DIR
from tests.helpers import wait_for_background_work


# SQLite's reflection cannot read an index on an expression; the index is checked by
# test_usernames_are_unique_regardless_of_case_in_the_database instead.
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index uq_users_username_lower")
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index 'uq_users_")
def test_migrations_and_models_agree(app):
    with app.app_context():
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True, "render_as_batch": True})
            differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_init_db_is_idempotent(runner, app):
    for _ in range(2):
        result = runner.invoke(args=["init-db"])
        assert result.exit_code == 0, result.output
        assert "latest schema" in result.output


def test_login_sessions_migration_keeps_existing_data(app, client):
    """0002 on a database in use: accounts, tokens and chats from before it survive, and work."""
    with app.app_context():
        flask_migrate.downgrade(directory=MIGRATIONS_DIR, revision="0001")
        assert "login_sessions" not in sa.inspect(db.engine).get_table_names()
        db.session.remove()
    # Written with the tables as 0001 left them: a user (who can log in), a token, a chat.
    client.post("/api/v1/users", json={"username": "before", "password": "correct horse"})
    token = client.post("/api/v1/tokens", json={"username": "before", "password": "correct horse"}).get_json()
    headers = {"Authorization": f"Bearer {token['token']}"}
    # In SQL: the models may have columns that later migrations add.
    with unit_of_work(app) as session:
        session.execute(
            sa.text(
                "INSERT INTO conversations (owner_id, title, created_at, updated_at) "
                "VALUES ((SELECT id FROM users), 'kept', :now, :now)"
            ),
            {"now": utcnow()},
        )
    with app.app_context():
        upgrade_to_latest()
        db.session.remove()

    assert [c["title"] for c in client.get("/api/v1/conversations", headers=headers).get_json()["items"]] == ["kept"]
    assert client.post("/login", data={"username": "before", "password": "correct horse"}).status_code == 302
    assert client.get("/settings").status_code == 200
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(User)) == 1
        assert session.scalar(sa.select(sa.func.count()).select_from(ApiToken)) == 1
        assert session.scalar(sa.select(sa.func.count()).select_from(LoginSession)) == 1


@pytest.mark.parametrize("extra_config", [{"REPLY_LEASE_SECONDS": 0}], indirect=True)
def test_reply_leases_migration_restarts_replies_that_were_in_progress(app, auth):
    """0003 on a database with replies mid-way: each is run again from the start, once."""
    auth.register("before")
    with app.app_context():
        flask_migrate.downgrade(directory=MIGRATIONS_DIR, revision="0002")
        db.session.remove()
    now = utcnow()
    with unit_of_work(app) as session:
        user_id = session.scalar(sa.select(User.id))
        conversation_id = session.execute(
            sa.text(
                "INSERT INTO conversations (owner_id, title, created_at, updated_at) "
                "VALUES (:owner, 't', :now, :now) RETURNING id"
            ),
            {"owner": user_id, "now": now},
        ).scalar()
        rows = [
            ("user", "hello there", "complete"),
            ("assistant", "", "pending"),
            ("user", "hello again", "complete"),
            ("assistant", "hello ag", "streaming"),
        ]
        for role, content, status in rows:
            # As the old read-then-insert race could leave it: two replies in progress.
            session.execute(
                sa.text(
                    "INSERT INTO messages (conversation_id, role, content, status, attempt, "
                    "created_at, updated_at) VALUES (:c, :role, :content, :status, 0, :now, :now)"
                ),
                {"c": conversation_id, "role": role, "content": content, "status": status, "now": now},
            )
    with app.app_context():
        upgrade_to_latest()
        db.session.remove()
    with unit_of_work(app, write=False) as session:
        older, newest = session.scalars(
            sa.select(Message).where(Message.role == Role.ASSISTANT).order_by(Message.id)
        ).all()
        assert (older.status, older.error) == (Status.FAILED, "interrupted; regenerate to retry")
        assert (newest.status, newest.lease_owner) == (Status.STREAMING, "released")
    assert sweep_once(app) == [newest.id]
    wait_for_background_work(app)
    with unit_of_work(app, write=False) as session:
        reply = session.get(Message, newest.id)
        # Not "hello ag" + "hello again": the partial text of the old run is gone.
        assert (reply.status, reply.content, reply.attempt) == (Status.COMPLETE, "hello again", 1)


def seed_conversation(app) -> int:
    with unit_of_work(app) as session:
        user = User(username="owner", password_hash="x")
        session.add(user)
        session.flush()
        conversation = Conversation(owner_id=user.id, title="t")
        session.add(conversation)
        session.flush()
        for role in (Role.USER, Role.ASSISTANT):
            session.add(Message(conversation_id=conversation.id, role=role, content="hi"))
        return conversation.id


def test_deleting_a_conversation_deletes_its_messages_in_the_database(app):
    conversation_id = seed_conversation(app)
    # A Core DELETE bypasses the ORM entirely: only ON DELETE CASCADE can remove the messages.
    with unit_of_work(app) as session:
        session.execute(sa.delete(Conversation.__table__).where(Conversation.id == conversation_id))
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 0


def test_role_and_status_are_checked_by_the_database(app):
    conversation_id = seed_conversation(app)
    with pytest.raises(sa.exc.IntegrityError):
        with unit_of_work(app) as session:
            session.execute(
                sa.text(
                    "INSERT INTO messages (conversation_id, role, content, status, created_at, updated_at)"
                    " VALUES (:c, 'robot', '', 'complete', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"c": conversation_id},
            )


def test_timestamps_come_back_timezone_aware(app):
    seed_conversation(app)
    with unit_of_work(app, write=False) as session:
        message = session.scalars(sa.select(Message)).first()
        assert message.created_at.tzinfo is not None
        assert message.status is Status.COMPLETE


def test_indexes_for_the_app_queries_exist(app):
    with app.app_context():
        inspector = sa.inspect(db.engine)
        message_indexes = {tuple(ix["column_names"]) for ix in inspector.get_indexes("messages")}
        conversation_indexes = {tuple(ix["column_names"]) for ix in inspector.get_indexes("conversations")}
    assert ("conversation_id", "id") in message_indexes
    assert ("owner_id", "updated_at", "id") in conversation_indexes


def test_models_and_titles_migration_keeps_existing_chats(app, auth):
    """0004b on a database with chats: they keep their rows, get the defaults, and work."""
    from alembic.script import ScriptDirectory

    before = ScriptDirectory(MIGRATIONS_DIR).get_revision("0004b").down_revision
    headers = auth.headers("before")
    with app.app_context():
        flask_migrate.downgrade(directory=MIGRATIONS_DIR, revision=before)
        assert "model" not in {c["name"] for c in sa.inspect(db.engine).get_columns("conversations")}
        db.session.remove()
    now = utcnow()
    with unit_of_work(app) as session:
        conversation_id, untitled_id = (
            session.execute(
                sa.text(
                    "INSERT INTO conversations (owner_id, title, created_at, updated_at) "
                    "VALUES ((SELECT id FROM users), :title, :now, :now) RETURNING id"
                ),
                {"now": now, "title": title},
            ).scalar()
            for title in ("kept", "New chat")
        )
        session.execute(
            sa.text(
                "INSERT INTO messages (conversation_id, role, content, status, attempt, runs, "
                "created_at, updated_at) VALUES (:c, 'user', 'hello', 'complete', 0, 0, :now, :now)"
            ),
            {"c": conversation_id, "now": now},
        )
    with app.app_context():
        upgrade_to_latest()
        db.session.remove()
    with unit_of_work(app, write=False) as session:
        conversation = session.get(Conversation, conversation_id)
        # A title someone gave is theirs; a default one is left for the title job.
        assert (conversation.title, conversation.title_source) == ("kept", "user")
        assert session.get(Conversation, untitled_id).title_source == "default"
        assert (conversation.model, conversation.system_prompt) == (None, None)
        assert session.scalar(sa.select(Message.model)) is None
    body = app.test_client().get(f"/api/v1/conversations/{conversation_id}", headers=headers).get_json()
    assert (body["title"], body["model"], body["system_prompt"]) == ("kept", None, None)
