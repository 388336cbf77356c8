"""The migration that makes messages a tree, on a database with data, both ways."""

import flask_migrate
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from chatapp.chat.models import Conversation, Message
from chatapp.db import db, unit_of_work, utcnow
from chatapp.db.schema import upgrade_to_latest
from chatapp.extensions import MIGRATIONS_DIR, migrate
from tests.helpers import wait_for_background_work

TREE_REVISION = "0004t"


def revision_before_tree(app) -> str:
    """The revision the tree migration follows, as its script says (migrations get re-chained)."""
    with app.app_context():
        script = ScriptDirectory.from_config(migrate.get_config(MIGRATIONS_DIR))
    down = script.get_revision(TREE_REVISION).down_revision
    assert isinstance(down, str)
    return down


def seed_linear_conversations(app, auth) -> tuple[dict, list[int]]:
    """Two conversations written with the tables as they were before the tree: one of five
    messages (interleaved with the other's, so ids are not contiguous), and one empty."""
    headers = auth.headers("alice")
    with app.app_context():
        flask_migrate.downgrade(directory=MIGRATIONS_DIR, revision=revision_before_tree(app))
        assert "parent_id" not in {c["name"] for c in sa.inspect(db.engine).get_columns("messages")}
        db.session.remove()
    now = utcnow()
    insert_conversation = sa.text(
        "INSERT INTO conversations (owner_id, title, created_at, updated_at) "
        "VALUES ((SELECT id FROM users WHERE username = 'alice'), :title, :now, :now) RETURNING id"
    )
    insert_message = sa.text(
        "INSERT INTO messages (conversation_id, role, content, status, attempt, runs, created_at, updated_at) "
        "VALUES (:c, :role, :content, 'complete', 0, 0, :now, :now) RETURNING id"
    )
    with unit_of_work(app) as session:
        main = session.execute(insert_conversation, {"title": "main", "now": now}).scalar()
        other = session.execute(insert_conversation, {"title": "other", "now": now}).scalar()
        session.execute(insert_conversation, {"title": "empty", "now": now})
        ids = []
        for n, role in enumerate(["user", "assistant", "user", "assistant", "user"]):
            ids.append(
                session.execute(insert_message, {"c": main, "role": role, "content": f"m{n}", "now": now}).scalar()
            )
            session.execute(insert_message, {"c": other, "role": role, "content": f"o{n}", "now": now})
    return headers, ids


def test_upgrade_makes_each_conversation_one_branch_that_reads_the_same(app, client, auth):
    headers, ids = seed_linear_conversations(app, auth)
    with app.app_context():
        upgrade_to_latest()
        db.session.remove()
    with unit_of_work(app, write=False) as session:
        parents = dict(session.execute(sa.select(Message.id, Message.parent_id).where(Message.id.in_(ids))).all())
        conversations = {c.title: c for c in session.scalars(sa.select(Conversation))}
    assert [parents[i] for i in ids] == [None, *ids[:-1]]
    assert conversations["main"].current_leaf_id == ids[-1]
    assert conversations["empty"].current_leaf_id is None
    url = f"/api/v1/conversations/{conversations['main'].id}/messages"
    items = client.get(url, headers=headers).get_json()["items"]
    assert [m["content"] for m in items] == [f"m{n}" for n in range(5)]
    assert all(m["siblings"]["count"] == 1 for m in items)
    other_url = f"/api/v1/conversations/{conversations['other'].id}/messages"
    assert [m["content"] for m in client.get(other_url, headers=headers).get_json()["items"]] == [
        f"o{n}" for n in range(5)
    ]
    empty_url = f"/api/v1/conversations/{conversations['empty'].id}/messages"
    assert client.get(empty_url, headers=headers).get_json()["items"] == []
    # And it goes on as a tree: the last message answered, then an edit of the first.
    assert client.post(url, headers=headers, json={"content": "m5"}).status_code == 202
    wait_for_background_work(app)
    edited = client.post(f"{url}/{ids[0]}/edit", headers=headers, json={"content": "m0 again"})
    assert edited.status_code == 202, edited.get_json()
    wait_for_background_work(app)
    assert [m["content"] for m in client.get(url, headers=headers).get_json()["items"]] == ["m0 again", "m0 again"]


def test_downgrade_keeps_the_current_branch_as_the_linear_conversation(app, client, auth):
    headers, ids = seed_linear_conversations(app, auth)
    with app.app_context():
        upgrade_to_latest()
        db.session.remove()
    with unit_of_work(app, write=False) as session:
        main = session.scalar(sa.select(Conversation.id).where(Conversation.title == "main"))
    url = f"/api/v1/conversations/{main}/messages"
    # A second version of the third message makes an old branch, which the downgrade drops.
    assert client.post(f"{url}/{ids[2]}/edit", headers=headers, json={"content": "m2 again"}).status_code == 202
    wait_for_background_work(app)
    shown = [m["content"] for m in client.get(url, headers=headers).get_json()["items"]]
    assert shown == ["m0", "m1", "m2 again", "m2 again"]
    with app.app_context():
        flask_migrate.downgrade(directory=MIGRATIONS_DIR, revision=revision_before_tree(app))
        db.session.remove()
    with unit_of_work(app, write=False) as session:
        rows = session.execute(
            sa.text("SELECT content FROM messages WHERE conversation_id = :c ORDER BY id"), {"c": main}
        ).scalars()
        assert list(rows) == shown
        # The other conversation lost nothing through the copies of its tables.
        others = session.execute(
            sa.text(
                "SELECT count(*) FROM messages JOIN conversations c ON c.id = messages.conversation_id "
                "WHERE c.title = 'other'"
            )
        ).scalar()
        assert others == 5
    with app.app_context():
        upgrade_to_latest()
        db.session.remove()
    assert [m["content"] for m in client.get(url, headers=headers).get_json()["items"]] == shown
