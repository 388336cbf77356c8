"""The hot API paths that skip the ORM and marshmallow answer exactly as if they had not.

Messages and conversation pages are read as plain rows and dumped by functions written out
from the schemas (chatapp.api.schemas.plain_dump); Bearer auth reads plain columns;
POST message writes with Core statements. Each is checked here against what the ORM
objects and the marshmallow schemas give, on every backend.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from flask import g
from marshmallow import Schema, fields
from sqlalchemy import event

from chatapp.api.auth import current_user_id, require_user
from chatapp.api.schemas import (
    ConversationOut,
    ConversationPage,
    MessageOut,
    MessagePage,
    conversation_json,
    message_json,
    plain_dump,
)
from chatapp.auth import services as auth_services
from chatapp.auth.models import ApiToken, User
from chatapp.chat import services as chat
from chatapp.chat.models import ACTIVE_STATUSES, Conversation, Message, Role, Status
from chatapp.db import begin_write, db, unit_of_work
from chatapp.extensions import limiter
from tests.api.test_accounts import assert_error
from tests.helpers import link_as_one_branch, wait_for_background_work
from tests.web.conftest import csrf_from

ERRORS = (None, "the bot failed: timeout")


def alice_id(app) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(User.id).where(User.username == "alice"))


def seed_every_kind_of_message(app, owner_id: int) -> int:
    """A conversation holding a message of every role and status, with and without an error,
    including timestamps with and without microseconds (isoformat drops zero microseconds).

    The database allows one reply in progress per conversation: of the active statuses,
    only the first combination is stored."""
    stamps = [
        datetime(2024, 5, 17, 9, 30, 0, tzinfo=UTC),
        datetime(2024, 5, 17, 9, 30, 0, 123456, tzinfo=UTC),
    ]
    with unit_of_work(app) as session:
        conversation = Conversation(owner_id=owner_id, title="every kind")
        session.add(conversation)
        session.flush()
        n = 0
        active_stored = False
        for role in Role:
            for status in Status:
                for error in ERRORS:
                    if status in ACTIVE_STATUSES:
                        if active_stored:
                            continue
                        active_stored = True
                    session.add(
                        Message(
                            conversation_id=conversation.id,
                            role=role,
                            status=status,
                            error=error,
                            content=f"{role.value} {status.value} ünïcode \u2603 {n}",
                            created_at=stamps[n % 2],
                            updated_at=stamps[(n + 1) % 2],
                        )
                    )
                    n += 1
        session.flush()
        link_as_one_branch(session, conversation.id)
        return conversation.id


def orm_messages(app, conversation_id: int) -> list[Message]:
    with unit_of_work(app, write=False) as session:
        return list(
            session.scalars(sa.select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id))
        )


def test_plain_dump_gives_what_the_schema_dumps_for_every_role_status_and_error(app, alice):
    conversation_id = seed_every_kind_of_message(app, alice_id(app))
    objects = orm_messages(app, conversation_id)
    assert len(objects) == len(Role) * (len(Status) - len(ACTIVE_STATUSES)) * len(ERRORS) + 1
    with app.test_request_context():
        page = chat.list_messages(conversation_id, 100)
        db.session.rollback()
    assert [row.id for row in page.items] == [m.id for m in objects]
    for orm_object, row in zip(objects, page.items, strict=True):
        expected = MessageOut().dump(orm_object)
        assert message_json(orm_object) == expected
        assert message_json(row) == expected  # the row the list view reads
        assert MessageOut().dump(row) == expected
        assert list(message_json(row)) == list(expected)  # same keys, same order


def test_plain_dump_follows_the_schema_and_refuses_what_it_cannot_dump():
    """The shape lives in the schema alone: a field added there is in the plain dump too, and
    a field the generator does not know stops the import instead of being dumped differently."""

    class Extended(MessageOut):
        attempt = fields.Integer(required=True, attribute="run", data_key="run_number")

    row = seed_row()
    assert plain_dump(Extended)(row) == Extended().dump(row)
    assert plain_dump(Extended)(row)["run_number"] == row.run

    class Unknown(Schema):
        price = fields.Decimal()

    with pytest.raises(TypeError, match="Unknown.price"):
        plain_dump(Unknown)


def seed_row():
    from types import SimpleNamespace

    stamp = datetime(2024, 5, 17, 9, 30, 0, 5, tzinfo=UTC)
    return SimpleNamespace(
        id=3,
        conversation_id=4,
        parent_id=None,
        role=Role.USER,
        content="text",
        status=Status.COMPLETE,
        error=None,
        created_at=stamp,
        updated_at=stamp,
        run=2,
        model="echo",
    )


def test_messages_page_is_the_bytes_flask_smorest_would_send(app, client, alice):
    conversation_id = seed_every_kind_of_message(app, alice_id(app))
    objects = orm_messages(app, conversation_id)
    url = f"/api/v1/conversations/{conversation_id}/messages"
    cursor, pages = None, 0
    while True:
        response = client.get(url, headers=alice, query_string={"limit": 7, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200 and response.mimetype == "application/json"
        shown, objects = objects[:7], objects[7:]
        cursor = response.get_json()["next_cursor"]
        # One branch: every message is the only version of itself.
        alone = {"index": 1, "count": 1, "previous_id": None, "next_id": None}
        items = [SimpleNamespace(**MessageOut().dump(m), siblings=alone) for m in shown]
        for item, orm_object in zip(items, shown, strict=True):
            item.role, item.status = orm_object.role, orm_object.status
            item.created_at, item.updated_at = orm_object.created_at, orm_object.updated_at
        with app.app_context():
            expected = app.json.response(MessagePage().dump({"items": items, "next_cursor": cursor}))
        assert response.data == expected.data
        pages += 1
        if cursor is None:
            break
    assert objects == [] and pages == 3  # 19 messages, 7 a page


def test_conversations_page_is_the_bytes_flask_smorest_would_send(app, client, alice):
    for title in ("one", "two", "three"):
        assert client.post("/api/v1/conversations", headers=alice, json={"title": title}).status_code == 201
    with unit_of_work(app, write=False) as session:
        objects = list(
            session.scalars(sa.select(Conversation).order_by(Conversation.updated_at.desc(), Conversation.id.desc()))
        )
    first = client.get("/api/v1/conversations?limit=2", headers=alice)
    cursor = first.get_json()["next_cursor"]
    second = client.get("/api/v1/conversations", headers=alice, query_string={"limit": 2, "cursor": cursor})
    with app.app_context():
        for response, shown, next_cursor in ((first, objects[:2], cursor), (second, objects[2:], None)):
            assert response.status_code == 200
            expected = app.json.response(ConversationPage().dump({"items": shown, "next_cursor": next_cursor}))
            assert response.data == expected.data
    for orm_object in objects:
        assert conversation_json(orm_object) == ConversationOut().dump(orm_object)


def test_a_conversations_cursor_with_a_naive_stamp_still_pages(app, client, alice):
    """Cursors are opaque, but one holding a naive stamp was answered, not refused with a 500."""
    client.post("/api/v1/conversations", headers=alice, json={"title": "t"})
    cursor = base64.urlsafe_b64encode(b"2999-01-01T00:00:00|99").decode().rstrip("=")
    response = client.get("/api/v1/conversations", headers=alice, query_string={"cursor": cursor})
    assert response.status_code == 200
    assert [c["title"] for c in response.get_json()["items"]] == ["t"]


def as_instants(item: dict) -> dict:
    """A dumped message with its timestamps parsed: the same instant reads back in the
    database session's time zone, which need not be UTC."""
    return {**item, **{key: datetime.fromisoformat(item[key]) for key in ("created_at", "updated_at")}}


def test_posted_messages_dump_as_message_out_and_as_they_read_back(app, client, alice):
    conversation = client.post("/api/v1/conversations", headers=alice, json={}).get_json()
    url = f"/api/v1/conversations/{conversation['id']}/messages"
    with app.test_request_context():
        begin_write()
        message, reply, _created = chat.post_message_to(conversation["id"], "hello")
        db.session.commit()
    for new in (message, reply):
        assert message_json(new) == MessageOut().dump(new)
    assert (message.role, message.status, reply.role, reply.status) == (
        Role.USER,
        Status.COMPLETE,
        Role.ASSISTANT,
        Status.PENDING,
    )
    assert message.id < reply.id
    listed = client.get(url, headers=alice).get_json()["items"]
    alone = {"index": 1, "count": 1, "previous_id": None, "next_id": None}
    assert [as_instants(m) for m in listed] == [
        as_instants({**message_json(m), "siblings": alone}) for m in (message, reply)
    ]
    after = client.get(f"/api/v1/conversations/{conversation['id']}", headers=alice).get_json()
    assert datetime.fromisoformat(after["updated_at"]) == reply.updated_at


def test_post_message_keeps_a_loaded_conversation_in_step(app, alice):
    """The web posts with a loaded Conversation: its updated_at follows, with no second UPDATE."""
    owner_id = alice_id(app)
    with app.test_request_context():
        begin_write()
        conversation = chat.create_conversation(owner_id, "web")
        db.session.commit()
        before = conversation.updated_at
        begin_write()
        _message, reply = chat.post_message(conversation, "from the web")
        assert conversation.updated_at == reply.updated_at > before
        assert conversation not in db.session.dirty
        db.session.commit()
        db.session.expire(conversation)
        assert conversation.updated_at == reply.updated_at
        db.session.rollback()


# --- Bearer auth reads plain columns -------------------------------------------------------


def count_statements(app):
    """SQL statements run on the app's engines (not BEGIN), collected in a list."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if not statement.lstrip().upper().startswith("BEGIN"):
            seen.append(statement)

    with app.app_context():
        engines = list(db.engines.values())
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    return seen, lambda: [event.remove(e, "before_cursor_execute", record) for e in engines]


def test_a_bearer_request_loads_no_orm_object(app, client, alice):
    client.get("/api/v1/conversations", headers=alice)  # last_used_at is recorded once
    user_id = alice_id(app)
    with app.test_request_context(headers=alice):
        require_user()
        assert current_user_id() == user_id
        assert len(db.session.identity_map) == 0  # a row, not an ApiToken or a User
        assert g.api_token.user_id == current_user_id()
        db.session.rollback()


def test_the_messages_list_runs_four_statements(app, client, alice):
    conversation = client.post("/api/v1/conversations", headers=alice, json={}).get_json()
    url = f"/api/v1/conversations/{conversation['id']}/messages"
    assert client.post(url, headers=alice, json={"content": "hi"}).status_code == 202
    wait_for_background_work(app)
    client.get(url, headers=alice)  # last_used_at is recorded once
    seen, stop = count_statements(app)
    try:
        assert client.get(url, headers=alice).status_code == 200
    finally:
        stop()
    # The token (with its user), the conversation's owner, the page of the current branch,
    # the versions beside its messages: nothing else.
    assert len(seen) == 4, seen


def test_cookie_users_still_work_with_ids(app, client, auth):
    """The page's own fetches: Flask-Login's user, its id for the fast paths."""
    auth.register("browser")
    assert client.post("/login", data={"username": "browser", "password": "correct horse"}).status_code == 302
    csrf = {"X-CSRFToken": csrf_from(client.get("/settings").get_data(as_text=True))}
    created = client.post("/api/v1/conversations", json={"title": "by cookie"}, headers=csrf)
    assert created.status_code == 201
    listed = client.get("/api/v1/conversations").get_json()["items"]
    assert [c["title"] for c in listed] == ["by cookie"]
    url = f"/api/v1/conversations/{created.get_json()['id']}/messages"
    assert client.post(url, json={"content": "hi"}, headers=csrf).status_code == 202
    assert [m["content"] for m in client.get(url).get_json()["items"]][:1] == ["hi"]


def test_a_token_whose_user_is_gone_is_refused(app, client, alice):
    """On PostgreSQL the token goes with its user (ON DELETE CASCADE); on SQLite with foreign
    keys off it stays, and the token query's join to users refuses it."""
    with app.app_context():
        url = db.engine.url
    if url.get_backend_name() == "sqlite":
        # A connection of its own: SQLite's foreign keys are off unless a connection turns them on.
        with contextlib.closing(sqlite3.connect(url.database)) as raw:
            raw.execute("DELETE FROM users WHERE username = 'alice'")
            raw.commit()
            assert raw.execute("SELECT count(*) FROM api_tokens").fetchone() == (1,)
    else:
        with unit_of_work(app) as session:
            session.execute(sa.delete(User).where(User.username == "alice"))
    assert_error(client.get("/api/v1/conversations", headers=alice), 401, "invalid_token")


def test_revoking_by_row_and_by_object(app, client, auth):
    """DELETE /tokens/current revokes the row require_user read; the web revokes an ApiToken."""
    headers = auth.headers("revoker")
    with app.test_request_context(headers=headers):
        begin_write()
        require_user()
        auth_services.revoke_token(g.api_token)
        db.session.commit()
        db.session.rollback()
    assert_error(client.get("/api/v1/conversations", headers=headers), 401, "invalid_token")
    token = auth.token("revoker")
    with app.test_request_context():
        begin_write()
        row = auth_services.find_user_token(
            db.session.scalar(sa.select(User.id).where(User.username == "revoker")),
            db.session.scalar(sa.select(sa.func.max(ApiToken.id))),
        )
        auth_services.revoke_token(row)
        first = row.revoked_at
        assert first is not None  # the loaded object sees its own revocation
        auth_services.revoke_token(row)  # again: keeps the time it was first revoked
        db.session.commit()
        db.session.expire(row)
        assert row.revoked_at == first
        db.session.rollback()
    assert_error(
        client.get("/api/v1/conversations", headers={"Authorization": f"Bearer {token}"}), 401, "invalid_token"
    )


# --- rate limits without the per-request hook ------------------------------------------------

LIMITS = {
    "RATELIMIT_ENABLED": True,
    "RATELIMIT_TOKENS": "3 per minute",
    "RATELIMIT_REGISTER": "2 per minute",
    "RATELIMIT_LOGIN": "3 per minute",
}


@pytest.mark.parametrize("extra_config", [LIMITS])
def test_decorated_limits_hold_without_the_before_request_hook(app, client, auth):
    assert limiter._check_request_limit not in app.before_request_funcs[None]
    auth.register("limited")
    good = {"username": "limited", "password": "correct horse"}
    responses = [client.post("/api/v1/tokens", json=good) for _ in range(4)]
    assert [r.status_code for r in responses] == [201, 201, 201, 429]
    # The X-RateLimit-* headers of the limited route are still sent.
    assert responses[0].headers["X-RateLimit-Limit"] == "3"
    assert responses[1].headers["X-RateLimit-Remaining"] == "1"
    token = responses[0].get_json()["token"]
    for _ in range(6):  # unlimited routes stay unlimited
        assert client.get("/api/v1/conversations", headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.fixture
def default_limit():
    yield
    # Flask-Limiter keeps limits from config on its (module-global) extension object:
    # later apps would inherit this one.
    limiter.limit_manager.set_default_limits([])


@pytest.mark.parametrize("extra_config", [{**LIMITS, "RATELIMIT_DEFAULT": "2 per minute"}])
def test_a_configured_default_limit_keeps_the_hook(default_limit, app, client):
    assert limiter._check_request_limit in app.before_request_funcs[None]
    assert [client.get("/healthz").status_code for _ in range(3)] == [200, 200, 429]


@pytest.mark.parametrize(
    "query",
    [
        "",
        "limit=20",
        "limit=1",
        "limit=100",
        "limit=007",
        "cursor=abc",
        "limit=5&cursor=MTI",
        "limit=0",
        "limit=101",
        "limit=-1",
        "limit=+5",
        "limit= 5",
        "limit=5.0",
        "limit=",
        "limit=１２",
        "limit=1_0",
        "cursor=",
        "cursor=" + "x" * 201,
        "cursor=" + "x" * 200,
        "limit=5&limit=6",
        "other=1",
        "limit=5&other=1",
        "cursor=a&cursor=b",
    ],
)
def test_the_page_query_shortcut_reads_what_webargs_reads(app, query):
    """chatapp.api.fast_args answers a plain page query as PageQuery through webargs would,
    and leaves everything else (errors, unknown or repeated parameters) to webargs."""
    from webargs.flaskparser import FlaskParser
    from werkzeug.exceptions import HTTPException

    from chatapp.api.fast_args import PAGE_QUERY_PARSER, _plain_page_query
    from chatapp.api.schemas import PageQuery

    def outcome(parser):
        try:
            return parser.parse(PageQuery(), location="query")
        except HTTPException as error:
            return ("error", error.code, getattr(error, "data", {}).get("messages"))

    with app.test_request_context(f"/api/v1/conversations?{query}"):
        assert outcome(PAGE_QUERY_PARSER) == outcome(FlaskParser())
        shortcut = _plain_page_query(flask_request())
        if shortcut is not None:
            assert shortcut == FlaskParser().parse(PageQuery(), location="query")


def flask_request():
    from flask import request

    return request
