"""The migration that makes usernames unique regardless of case, on a database with data."""

import logging

import flask_migrate
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from chatapp.auth.models import User
from chatapp.chat.models import Conversation
from chatapp.db import db, unit_of_work, utcnow
from chatapp.db.schema import upgrade_to_latest
from chatapp.extensions import MIGRATIONS_DIR

REVISION = "0004a"


def revision_before() -> str:
    """The revision this migration follows, as its script says (revisions get re-chained)."""
    script = ScriptDirectory(MIGRATIONS_DIR)
    down = script.get_revision(REVISION).down_revision
    assert isinstance(down, str)
    return down


def insert_user(session, username: str) -> int:
    return session.execute(
        sa.text("INSERT INTO users (username, password_hash, created_at) VALUES (:name, 'x', :now) RETURNING id"),
        {"name": username, "now": utcnow()},
    ).scalar_one()


def test_duplicates_in_another_case_are_renamed_and_logged_and_nothing_is_lost(app, auth, caplog):
    with app.app_context():
        flask_migrate.downgrade(directory=MIGRATIONS_DIR, revision=revision_before())
        db.session.remove()
    long_name = "x" * 40
    with unit_of_work(app) as session:
        ids = {name: insert_user(session, name) for name in ("alice", "ALICE", "Alice", "alice-2", "bob")}
        ids["long"] = insert_user(session, long_name)
        ids["LONG"] = insert_user(session, long_name.upper())
        session.execute(
            sa.text(
                "INSERT INTO conversations (owner_id, title, created_at, updated_at) VALUES (:owner, 'kept', :now, :now)"
            ),
            {"owner": ids["Alice"], "now": utcnow()},
        )
    caplog.set_level(logging.WARNING)
    with app.app_context():
        upgrade_to_latest()
        db.session.remove()

    with unit_of_work(app, write=False) as session:
        names = dict(session.execute(sa.select(User.id, User.username)).all())
        owner = session.scalar(sa.select(Conversation.owner_id))
    # The oldest keeps its name; later ones get the first free suffix; other names stay.
    assert names == {
        ids["alice"]: "alice",
        ids["ALICE"]: "ALICE-3",
        ids["Alice"]: "Alice-4",
        ids["alice-2"]: "alice-2",
        ids["bob"]: "bob",
        ids["long"]: long_name,
        ids["LONG"]: "X" * 38 + "-2",
    }
    assert owner == ids["Alice"]
    renamed = [r.getMessage() for r in caplog.records if "renamed" in r.getMessage()]
    assert len(renamed) == 3 and "'Alice-4'" in renamed[1]

    # From now on the database itself refuses a name in another case.
    with pytest.raises(sa.exc.IntegrityError), unit_of_work(app) as session:
        insert_user(session, "BOB")


def test_the_migration_goes_down_and_up_again(app):
    with app.app_context():
        flask_migrate.downgrade(directory=MIGRATIONS_DIR, revision=revision_before())
        assert "uq_users_username_lower" not in {i["name"] for i in sa.inspect(db.engine).get_indexes("users")}
        upgrade_to_latest()
        db.session.remove()
    with unit_of_work(app, write=False) as session:
        if session.get_bind().dialect.name == "sqlite":
            sql = session.scalar(sa.text("SELECT sql FROM sqlite_master WHERE name = 'uq_users_username_lower'"))
        else:
            sql = session.scalar(sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = 'uq_users_username_lower'"))
    assert "UNIQUE" in sql.upper() and "lower((username)" in sql.lower().replace("lower(username", "lower((username")


def test_looking_up_a_name_in_any_case_uses_the_index(app):
    """Logins and registrations compare lower(username): the index must serve that query."""
    from chatapp.auth.services import find_user

    with app.app_context():
        query = sa.select(User).where(sa.func.lower(User.username) == "alice")
        if db.engine.dialect.name == "sqlite":
            compiled = query.compile(db.engine, compile_kwargs={"literal_binds": True})
            plan = " ".join(str(row[-1]) for row in db.session.execute(sa.text(f"EXPLAIN QUERY PLAN {compiled}")))
            assert "uq_users_username_lower" in plan, plan
        else:
            db.session.execute(sa.text("SET LOCAL enable_seqscan = off"))  # an empty table: force the choice
            compiled = query.compile(db.engine, compile_kwargs={"literal_binds": True})
            plan = " ".join(row[0] for row in db.session.execute(sa.text(f"EXPLAIN {compiled}")))
            assert "uq_users_username_lower" in plan, plan
        assert find_user("ALICE") is None
        db.session.rollback()
        db.session.remove()
