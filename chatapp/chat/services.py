"""Conversation and message rules. Services add and flush; the caller commits."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.orm.attributes import set_committed_value

from chatapp import inputs
from chatapp.chat.history import fit_history
from chatapp.chat.models import ACTIVE_STATUSES, Conversation, Message, Role, Status
from chatapp.db import db, utcnow
from chatapp.errors import Conflict, InvalidInput, NotFound
from chatapp.security import parse_bounded_int

DEFAULT_TITLE = "New chat"


@dataclass(frozen=True)
class Page:
    items: Sequence
    next_cursor: str | None


# --- cursors -----------------------------------------------------------------


def _encode_cursor(*parts: object) -> str:
    raw = "|".join(str(part) for part in parts).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _bad_cursor() -> InvalidInput:
    return InvalidInput("cursor is not valid; use next_cursor from a previous page", field="cursor")


# What _encode_cursor gives: URL-safe base64 without padding (a length of 1 more than a
# multiple of 4 is no base64 at all). Anything else, padding and stray characters included,
# is refused before decoding, so the OpenAPI document's pattern is the whole syntax.
CURSOR_PATTERN = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?$"
_CURSOR = re.compile(CURSOR_PATTERN)


def _decode_cursor(cursor: str, count: int) -> list[str]:
    if not _CURSOR.fullmatch(cursor):
        raise _bad_cursor()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _bad_cursor() from None
    parts = raw.split("|")
    if len(parts) != count:
        raise _bad_cursor()
    return parts


def _cursor_id(text: str) -> int:
    """The id in a cursor: ASCII digits an id column can hold (a larger one would overflow)."""
    value = parse_bounded_int(text)
    if value is None:
        raise _bad_cursor()
    return value


# --- conversations ------------------------------------------------------------


def validate_title(title: object) -> str:
    problem = inputs.title_problem(title)
    if problem or not isinstance(title, str):  # a problem names every value that is not text
        raise InvalidInput(f"title {problem}", field="title")
    return title.strip()


def create_conversation(
    owner_id: int, title: object = None, *, model: str | None = None, system_prompt: str | None = None
) -> Conversation:
    """A new conversation; ``model`` and ``system_prompt`` were checked (chatapp.chat.catalog)
    before the write began, as listing models may ask the model server."""
    conversation = Conversation(
        owner_id=owner_id,
        title=DEFAULT_TITLE if title is None else validate_title(title),
        title_source="default" if title is None else "user",
        model=model,
        system_prompt=system_prompt,
    )
    db.session.add(conversation)
    db.session.flush()
    return conversation


_UNSET: Any = object()


def change_conversation_settings(
    conversation: Conversation, *, model: str | None = _UNSET, system_prompt: str | None = _UNSET
) -> Conversation:
    """Set a conversation's model or system prompt (checked by chatapp.chat.catalog); the next reply uses them."""
    if model is not _UNSET:
        conversation.model = model
    if system_prompt is not _UNSET:
        conversation.system_prompt = system_prompt
    db.session.flush()
    return conversation


# Statements on hot paths are built once, with bind parameters: building a select costs
# more CPU than running a cached one. Those that need no ORM object select the tables'
# plain columns, so no object is built for their rows.
_conversations, _messages = cast(sa.Table, Conversation.__table__), cast(sa.Table, Message.__table__)
_OWNED_CONVERSATION_OBJECT = sa.select(Conversation).where(
    Conversation.id == sa.bindparam("conversation_id"),
    Conversation.owner_id == sa.bindparam("owner_id"),
)
# The same check reading the id alone, as a Core statement on the table: derived from the
# ORM select above it would still run through the ORM's execution path (a fifth of the
# check's cost), for a row that needs none of it.
_OWNED_CONVERSATION = sa.select(_conversations.c.id).where(
    _conversations.c.id == sa.bindparam("conversation_id"),
    _conversations.c.owner_id == sa.bindparam("owner_id"),
)


def get_conversation(owner_id: int, conversation_id: int) -> Conversation:
    """The owner's conversation; someone else's is NotFound, so existence is never revealed."""
    conversation = db.session.scalar(
        _OWNED_CONVERSATION_OBJECT, {"conversation_id": conversation_id, "owner_id": owner_id}
    )
    if conversation is None:
        raise _conversation_not_found()
    return conversation


def _conversation_not_found() -> NotFound:
    return NotFound("conversation not found", code="conversation_not_found")


def check_conversation(owner_id: int, conversation_id: int, connection: sa.Connection | None = None) -> int:
    """get_conversation() for views that need only the id: reads the id alone, no object.

    Runs as Core on the session's connection (its transaction; ``connection``, if given,
    must be ``db.session.connection()``, which a view reading twice fetches once): the
    session's execute() adds ORM dispatch that a statement of plain columns never uses.
    """
    connection = connection if connection is not None else db.session.connection()
    found = connection.execute(_OWNED_CONVERSATION, {"conversation_id": conversation_id, "owner_id": owner_id}).scalar()
    if found is None:
        raise _conversation_not_found()
    return found


def rename_conversation(conversation: Conversation, title: object) -> Conversation:
    conversation.title = validate_title(title)
    conversation.title_source = "user"  # a generated title never replaces it
    conversation.updated_at = utcnow()
    db.session.flush()
    return conversation


def delete_conversation(conversation: Conversation) -> None:
    # Messages go with it through ON DELETE CASCADE in the database.
    db.session.delete(conversation)
    db.session.flush()


# Rows with exactly the attributes ConversationOut and the web sidebar read.
_CONVERSATION_PAGE = (
    sa.select(
        _conversations.c.id,
        _conversations.c.title,
        _conversations.c.created_at,
        _conversations.c.updated_at,
        _conversations.c.model,
        _conversations.c.system_prompt,
    )
    .where(_conversations.c.owner_id == sa.bindparam("owner_id"))
    .order_by(_conversations.c.updated_at.desc(), _conversations.c.id.desc())
    .limit(sa.bindparam("limit", type_=sa.Integer))
)
_CONVERSATION_PAGE_AFTER = _CONVERSATION_PAGE.where(
    sa.tuple_(_conversations.c.updated_at, _conversations.c.id)
    < sa.tuple_(
        # A plain DateTime, as the cursor's datetime would bind by itself; not the column's
        # UTCDateTime, which refuses the naive stamp a cursor may hold.
        sa.bindparam("after_updated_at", type_=sa.DateTime()),
        sa.bindparam("after_id", type_=sa.Integer),
    )
)


def list_conversations(owner_id: int, limit: int, cursor: str | None = None) -> Page:
    """A user's conversations, most recently updated first, as plain rows
    (id, title, created_at, updated_at, model, system_prompt)."""
    params: dict[str, object] = {"owner_id": owner_id, "limit": limit + 1}
    query = _CONVERSATION_PAGE
    if cursor:
        stamp, last_id = _decode_cursor(cursor, 2)
        try:
            params["after_updated_at"] = datetime.fromisoformat(stamp)
        except ValueError:
            raise _bad_cursor() from None
        params["after_id"] = _cursor_id(last_id)
        query = _CONVERSATION_PAGE_AFTER
    rows = db.session.execute(query, params).all()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = _encode_cursor(last.updated_at.isoformat(), last.id)
    return Page(rows, next_cursor)


# --- messages -------------------------------------------------------------------


def validate_content(content: object) -> str:
    problem = inputs.content_problem(content)
    if problem or not isinstance(content, str):  # a problem names every value that is not text
        raise InvalidInput(f"content {problem}", field="content")
    return content


# --- the tree: branches, siblings ---------------------------------------------------
# Messages form a tree (parent_id); a conversation shows and continues one branch, from a
# root down to its current leaf. A branch is read up from its leaf in ONE query, a
# recursive CTE (both databases have them), each step a primary-key lookup; ids grow down
# every branch, so ordering by id is the branch's order.

_up = _messages.alias("up")
_down = _messages.alias("down")
_CURRENT_LEAF = (
    sa.select(_conversations.c.current_leaf_id)
    .where(_conversations.c.id == sa.bindparam("conversation_id"))
    .scalar_subquery()
)
# The current branch's ids, from the leaf up to (not including) the message after_id: the
# rows above it are older (smaller ids), so the walk stops there. after_id=0: the whole branch.
_branch_anchor = sa.select(_messages.c.id, _messages.c.parent_id).where(
    _messages.c.id == _CURRENT_LEAF,
    _messages.c.conversation_id == sa.bindparam("conversation_id"),
    _messages.c.id > sa.bindparam("after_id", type_=sa.Integer),
)
_BRANCH = _branch_anchor.cte("branch", recursive=True)


def _parent_column(step: sa.CTE, column: str) -> sa.ScalarSelect:
    """A column of the parent of the walk's current row, looked up by primary key.

    Each step of a walk up is a correlated scalar subquery on the parent's id, not a join:
    PostgreSQL plans the join with the recursive CTE's work table as a hash join over the
    whole messages table, once per step (a quarter of a second for 1,000 steps); a
    subquery is one index lookup per step on both databases.
    """
    return sa.select(_up.c[column]).where(_up.c.id == step.c.parent_id).scalar_subquery()


_BRANCH = _BRANCH.union_all(
    sa.select(_BRANCH.c.parent_id, _parent_column(_BRANCH, "parent_id")).where(
        _BRANCH.c.parent_id > sa.bindparam("after_id", type_=sa.Integer)
    )
)
# Rows with exactly the attributes MessageOut reads from a row (siblings come apart).
MESSAGE_COLUMNS = (
    _messages.c.id,
    _messages.c.conversation_id,
    _messages.c.parent_id,
    _messages.c.role,
    _messages.c.content,
    _messages.c.status,
    _messages.c.error,
    _messages.c.created_at,
    _messages.c.updated_at,
    _messages.c.model,
)
_BRANCH_ROWS = sa.select(*MESSAGE_COLUMNS).select_from(_messages.join(_BRANCH, _messages.c.id == _BRANCH.c.id))
_MESSAGE_PAGE = _BRANCH_ROWS.order_by(_messages.c.id).limit(sa.bindparam("limit", type_=sa.Integer))


# Newest first (the web page): up from the leaf, or from the parent of the message
# ``before`` (the page's "earlier messages" link), no further than ``limit`` steps, so a
# page costs its own rows however long the branch.
def _newest_rows(anchor_id: sa.ColumnElement) -> sa.Select:
    start = sa.select(_messages.c.id, _messages.c.parent_id, sa.literal(1, sa.Integer).label("depth")).where(
        _messages.c.id == anchor_id, _messages.c.conversation_id == sa.bindparam("conversation_id")
    )
    walk = start.cte("newest", recursive=True)
    walk = walk.union_all(
        sa.select(walk.c.parent_id, _parent_column(walk, "parent_id"), walk.c.depth + 1).where(
            walk.c.parent_id.is_not(None), walk.c.depth < sa.bindparam("limit", type_=sa.Integer)
        )
    )
    return (
        sa.select(*MESSAGE_COLUMNS)
        .select_from(_messages.join(walk, _messages.c.id == walk.c.id))
        .order_by(_messages.c.id.desc())
    )


_MESSAGE_PAGE_NEWEST = _newest_rows(_CURRENT_LEAF)
_MESSAGE_PAGE_BEFORE = _newest_rows(
    sa.select(_down.c.parent_id).where(_down.c.id == sa.bindparam("before_id", type_=sa.Integer)).scalar_subquery()
)
# The siblings of a page's messages: the children of their parents, and the roots of the
# conversation when the page holds one (ix_messages_parent_id serves both).
_CHILDREN = sa.select(_messages.c.id, _messages.c.parent_id).where(
    _messages.c.parent_id.in_(sa.bindparam("parent_ids", expanding=True)),
    _messages.c.conversation_id == sa.bindparam("conversation_id"),
)
_ROOTS = sa.select(_messages.c.id, _messages.c.parent_id).where(
    _messages.c.parent_id.is_(None), _messages.c.conversation_id == sa.bindparam("conversation_id")
)
_CHILDREN_AND_ROOTS = sa.union_all(_CHILDREN, _ROOTS)


@dataclass(frozen=True)
class BranchMessage:
    """A message row of a branch with its place among its siblings (plain data)."""

    id: int
    conversation_id: int
    parent_id: int | None
    role: Role
    content: str
    status: Status
    error: str | None
    created_at: datetime
    updated_at: datetime
    model: str | None
    siblings: dict


def sibling_info(conversation_id: int, messages: Sequence, connection: sa.Connection | None = None) -> list[dict]:
    """For each message (anything with id and parent_id), its place among the versions beside
    it: {"index" (1-based), "count", "previous_id", "next_id"}, siblings ordered by id. One query."""
    if not messages:
        return []
    connection = connection if connection is not None else db.session.connection()
    parent_ids = sorted({m.parent_id for m in messages if m.parent_id is not None})
    has_root = any(m.parent_id is None for m in messages)
    params: dict[str, Any] = {"conversation_id": conversation_id, "parent_ids": parent_ids}
    query = _CHILDREN_AND_ROOTS if has_root else _CHILDREN
    groups: dict[int | None, list[int]] = {}
    for row in connection.execute(query, params):
        groups.setdefault(row.parent_id, []).append(row.id)
    return [_place(sorted(groups.get(m.parent_id) or [m.id]), m.id) for m in messages]


def _place(ids: list[int], message_id: int) -> dict:
    """Where ``message_id`` stands among its versions ``ids`` (sorted), as sibling_info says."""
    position = ids.index(message_id) if message_id in ids else 0
    return {  # keys in sorted order, as the JSON provider writes them
        "count": len(ids),
        "index": position + 1,
        "next_id": ids[position + 1] if position + 1 < len(ids) else None,
        "previous_id": ids[position - 1] if position > 0 else None,
    }


def _with_siblings(conversation_id: int, rows: Sequence, connection: sa.Connection | None) -> list[BranchMessage]:
    infos = sibling_info(conversation_id, rows, connection)
    make = cast(Callable[..., BranchMessage], BranchMessage)  # a row is its columns, in field order
    return [make(*row, info) for row, info in zip(rows, infos, strict=True)]


def list_messages(
    conversation_id: int, limit: int, cursor: str | None = None, connection: sa.Connection | None = None
) -> Page:
    """The conversation's current branch, oldest first, a page at a time, as BranchMessage
    rows (Core on the session's connection, as check_conversation): two queries."""
    params = {"conversation_id": conversation_id, "limit": limit + 1, "after_id": 0}
    if cursor:
        (last_id,) = _decode_cursor(cursor, 1)
        params["after_id"] = _cursor_id(last_id)
    connection = connection if connection is not None else db.session.connection()
    rows = connection.execute(_MESSAGE_PAGE, params).all()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1].id)
    return Page(_with_siblings(conversation_id, rows, connection), next_cursor)


def newest_of_branch(conversation_id: int, limit: int, before: int | None = None) -> list[BranchMessage]:
    """The newest ``limit`` messages of the current branch, or of the branch through the
    message ``before`` (those before it), newest first."""
    params = {"conversation_id": conversation_id, "limit": limit}
    query = _MESSAGE_PAGE_NEWEST
    if before is not None:
        query, params["before_id"] = _MESSAGE_PAGE_BEFORE, before
    connection = db.session.connection()
    return _with_siblings(conversation_id, connection.execute(query, params).all(), connection)


_MESSAGE_IN_CONVERSATION = sa.select(_messages.c.id, _messages.c.parent_id, _messages.c.role).where(
    _messages.c.id == sa.bindparam("message_id"), _messages.c.conversation_id == sa.bindparam("conversation_id")
)


def _message_in(conversation_id: int, message_id: int) -> sa.Row:
    row = db.session.execute(
        _MESSAGE_IN_CONVERSATION, {"conversation_id": conversation_id, "message_id": message_id}
    ).first()
    if row is None:
        raise NotFound("message not found in this conversation", code="message_not_found")
    return row


def list_siblings(conversation_id: int, message_id: int) -> list[BranchMessage]:
    """The versions of a message: it and the messages with its parent, oldest first."""
    message = _message_in(conversation_id, message_id)
    query = sa.select(*MESSAGE_COLUMNS).where(_messages.c.conversation_id == conversation_id)
    if message.parent_id is None:
        query = query.where(_messages.c.parent_id.is_(None))
    else:
        query = query.where(_messages.c.parent_id == message.parent_id)
    rows = db.session.execute(query.order_by(_messages.c.id)).all()
    # The rows are all the versions: their places need no sibling_info query.
    ids = [row.id for row in rows]
    make = cast(Callable[..., BranchMessage], BranchMessage)  # a row is its columns, in field order
    return [make(*row, _place(ids, row.id)) for row in rows]


# Down from a message to a leaf, taking the newest child at each step; the deepest row has
# the largest id (a child is newer than its parent).
_DESCENT = (
    sa.select(_messages.c.id)
    .where(_messages.c.id == sa.bindparam("message_id"), _messages.c.conversation_id == sa.bindparam("conversation_id"))
    .cte("descent", recursive=True)
)
_newer = _messages.alias("newer")
_DESCENT = _DESCENT.union_all(
    # The newest child, by a lookup (see _parent_column); None past the leaf, which ends the walk.
    sa.select(sa.select(sa.func.max(_newer.c.id)).where(_newer.c.parent_id == _DESCENT.c.id).scalar_subquery()).where(
        _DESCENT.c.id.is_not(None)
    )
)
_LEAF_BELOW = sa.select(sa.func.max(_DESCENT.c.id))


def select_branch(conversation: Conversation, message_id: int) -> int:
    """Make the branch through ``message_id`` current: that message, followed down by the
    newest child at each step to a leaf. Returns the new leaf's id; NotFound if the message
    is not one of this conversation's."""
    leaf_id = db.session.scalar(_LEAF_BELOW, {"conversation_id": conversation.id, "message_id": message_id})
    if leaf_id is None:
        raise NotFound("message not found in this conversation", code="message_not_found")
    conversation.current_leaf_id = leaf_id
    db.session.flush()
    return leaf_id


_ACTIVE_REPLY = (
    sa.select(_messages.c.id)
    .where(
        _messages.c.conversation_id == sa.bindparam("conversation_id"),
        _messages.c.status.in_(ACTIVE_STATUSES),
    )
    .limit(1)
)
_INSERT_MESSAGE = sa.insert(_messages)
# The branch moves on to the new reply.
_MOVE_LEAF = (
    sa.update(_conversations)
    .where(_conversations.c.id == sa.bindparam("conversation_id"))
    .values(updated_at=sa.bindparam("now"), current_leaf_id=sa.bindparam("leaf_id"))
)
_READ_LEAF = sa.select(_conversations.c.current_leaf_id).where(_conversations.c.id == sa.bindparam("conversation_id"))


def _reply_in_progress(conversation_id: int) -> bool:
    return db.session.execute(_ACTIVE_REPLY, {"conversation_id": conversation_id}).first() is not None


@dataclass(frozen=True)
class NewMessage:
    """A message just written, as plain values: the columns of Message, no ORM object."""

    id: int
    conversation_id: int
    parent_id: int | None
    role: Role
    content: str
    status: Status
    error: str | None
    attempt: int
    created_at: datetime
    updated_at: datetime
    model: str | None = None  # recorded on a reply when a run claims it


def _insert_message(
    conversation_id: int,
    parent_id: int | None,
    role: Role,
    content: str,
    status: Status,
    now: datetime,
    idempotency_key: str | None = None,
) -> NewMessage:
    values: dict[str, Any] = {
        "conversation_id": conversation_id,
        "parent_id": parent_id,
        "role": role,
        "content": content,
        "status": status,
        "error": None,
        "attempt": 0,
        "created_at": now,
        "updated_at": now,
    }
    # inserted_primary_key: RETURNING where the database has it, else the cursor's lastrowid.
    inserted = db.session.execute(_INSERT_MESSAGE, {**values, "runs": 0, "idempotency_key": idempotency_key})
    (new_id,) = cast(sa.Row, cast(sa.CursorResult, inserted).inserted_primary_key)
    return NewMessage(id=new_id, **values)


def post_message_to(
    conversation_id: int, content: object, idempotency_key: str | None = None
) -> tuple[NewMessage | Message, NewMessage | Message, bool]:
    """Add the user's message and a pending assistant reply to a conversation whose owner was
    checked (check_conversation); the caller commits, then starts the reply.

    Returns (message, reply, created). With an ``idempotency_key`` already used in this
    conversation, nothing is added: the message sent with it and its reply come back with
    created=False, so a client's retry never makes a duplicate (and never a 409).

    Two INSERTs and an UPDATE as Core statements: the ORM's flush of the same rows cost
    more CPU than the rest of the request's database work.
    """
    content = validate_content(content)
    if idempotency_key is not None:
        earlier = _sent_with_key(conversation_id, idempotency_key, content)
        if earlier is not None:
            return (*earlier, False)
    # Appended to the current branch; under the one-active-reply index, no other post or
    # edit can move the leaf between this read and the insert (it would fail first).
    parent_id = db.session.execute(_READ_LEAF, {"conversation_id": conversation_id}).scalar()
    return _add_exchange(conversation_id, parent_id, content, idempotency_key)


def _add_exchange(
    conversation_id: int, parent_id: int | None, content: str, idempotency_key: str | None = None
) -> tuple[NewMessage | Message, NewMessage | Message, bool]:
    """A user message under ``parent_id`` and a pending reply under it, which becomes the
    conversation's current leaf."""
    if _reply_in_progress(conversation_id):
        if idempotency_key is not None:
            # The first send with this key may have committed since the look above.
            earlier = _sent_with_key(conversation_id, idempotency_key, content)
            if earlier is not None:
                return (*earlier, False)
        raise _reply_in_progress_error()
    now = utcnow()
    try:
        # A savepoint: a concurrent post that won the race (the unique indexes on active
        # replies and on idempotency keys) undoes only these rows, not the caller's work.
        with db.session.begin_nested():
            message = _insert_message(
                conversation_id, parent_id, Role.USER, content, Status.COMPLETE, now, idempotency_key
            )
            reply = _insert_message(conversation_id, message.id, Role.ASSISTANT, "", Status.PENDING, now)
    except sa.exc.IntegrityError:
        if idempotency_key is not None:
            earlier = _sent_with_key(conversation_id, idempotency_key, content)
            if earlier is not None:
                return (*earlier, False)
        raise _reply_in_progress_error() from None
    db.session.execute(_MOVE_LEAF, {"conversation_id": conversation_id, "now": now, "leaf_id": reply.id})
    return message, reply, True


def edit_message(conversation_id: int, message_id: int, content: object) -> tuple[NewMessage, NewMessage]:
    """An edit of one of the user's messages: a new version beside it (same parent) with a
    new pending reply, made the current branch; the old branch stays as it was."""
    content = validate_content(content)
    original = _message_in(conversation_id, message_id)
    if original.role is not Role.USER:
        raise InvalidInput("only your own messages can be edited, not the bot's replies", field="message_id")
    message, reply, _created = _add_exchange(conversation_id, original.parent_id, content)
    return cast(NewMessage, message), cast(NewMessage, reply)


def _reply_in_progress_error() -> Conflict:
    return Conflict(
        "the bot is still answering in this conversation; wait for the reply to finish or stop it",
        code="reply_in_progress",
    )


def _sent_with_key(conversation_id: int, key: str, content: str) -> tuple[Message, Message] | None:
    """The message sent earlier with this Idempotency-Key and the reply after it, if any."""
    message = db.session.scalar(
        sa.select(Message).where(Message.conversation_id == conversation_id, Message.idempotency_key == key)
    )
    if message is None:
        return None
    if message.content != content:
        raise InvalidInput(
            "this Idempotency-Key was already used for a different message; send a new key with each new message",
            field="Idempotency-Key",
        )
    # The reply posted with it: its first child (later ones are regenerated versions).
    reply = db.session.scalar(
        sa.select(Message)
        .where(Message.conversation_id == conversation_id, Message.parent_id == message.id)
        .order_by(Message.id)
        .limit(1)
    )
    # Messages are only ever deleted with their conversation, so the reply is there.
    return (message, reply) if reply is not None else None


def post_message(conversation: Conversation, content: object) -> tuple[NewMessage | Message, NewMessage | Message]:
    """post_message_to() for a loaded Conversation, whose updated_at is kept in step."""
    message, reply, _created = post_message_to(conversation.id, content)
    # The row has it already: set it as loaded, not as a change to write again at commit.
    set_committed_value(conversation, "updated_at", reply.updated_at)
    set_committed_value(conversation, "current_leaf_id", reply.id)
    return message, reply


def get_reply(conversation: Conversation, reply_id: int) -> Message:
    reply = db.session.scalar(
        sa.select(Message).where(
            Message.id == reply_id,
            Message.conversation_id == conversation.id,
            Message.role == Role.ASSISTANT,
        )
    )
    if reply is None:
        raise NotFound("reply not found in this conversation", code="message_not_found")
    return reply


def restart_reply(conversation: Conversation, reply: Message) -> NewMessage:
    """Generate a finished or failed reply again: a new version beside it (same parent),
    pending, which becomes the current leaf; the old version stays as it was."""
    if reply.status in ACTIVE_STATUSES:
        raise Conflict("this reply is still being generated; wait for it to finish", code="reply_in_progress")
    if reply.id != conversation.current_leaf_id:
        raise Conflict("only the latest reply in a conversation can be regenerated", code="not_latest_reply")
    now = utcnow()
    try:
        with db.session.begin_nested():
            version = _insert_message(conversation.id, reply.parent_id, Role.ASSISTANT, "", Status.PENDING, now)
    except sa.exc.IntegrityError:
        # Another reply of this conversation started meanwhile (the one-active-reply index).
        raise _reply_in_progress_error() from None
    db.session.execute(_MOVE_LEAF, {"conversation_id": conversation.id, "now": now, "leaf_id": version.id})
    set_committed_value(conversation, "updated_at", now)
    set_committed_value(conversation, "current_leaf_id", version.id)
    return version


def stop_reply(conversation: Conversation, reply: Message) -> Message:
    """End a reply being generated as "stopped", keeping the text stored so far.

    One guarded UPDATE, whichever process runs the reply (or none, if it died): that
    process sees its lease gone within a second and closes the bot's request.
    """
    result = db.session.execute(
        sa.update(_messages)
        .where(_messages.c.id == reply.id, _messages.c.status.in_(ACTIVE_STATUSES))
        .values(status=Status.STOPPED, lease_owner=None, lease_expires_at=None, updated_at=utcnow())
    )
    db.session.refresh(reply)
    if cast(sa.CursorResult, result).rowcount != 1:
        raise Conflict(
            f"this reply has already ended ({reply.status.value}); there is nothing to stop",
            code="reply_not_running",
        )
    return reply


# --- the reply pipeline's writes (each called inside its own short unit of work) ---------


# Core statements built once (the pipeline runs them several times per reply): no ORM
# object is loaded or flushed, and the statement's compiled form is reused.
_REPLY_TO_CLAIM = sa.select(_messages.c.conversation_id, _messages.c.status, _messages.c.attempt).where(
    _messages.c.id == sa.bindparam("reply_id")
)
# The history the bot is sent: the ancestors of the reply (its own branch, whatever branch
# is current), newest first, in ONE query: a recursive CTE up from the reply's parent that
# carries the characters counted so far and stops one message past the budget, so a reply
# reads only as far back as fit_history can take. A stopped reply's text is what its user
# saw, so the bot sees it too; a failed one (and an empty one) is left out and not counted.
_SENT = sa.and_(_messages.c.status.in_((Status.COMPLETE, Status.STOPPED)), _messages.c.content != "")
_SENT_UP = sa.and_(_up.c.status.in_((Status.COMPLETE, Status.STOPPED)), _up.c.content != "")
_REPLY_PARENT = sa.select(_up.c.parent_id).where(_up.c.id == sa.bindparam("reply_id")).scalar_subquery()
_ANCESTORS = (
    sa.select(
        _messages.c.id,
        _messages.c.parent_id,
        sa.case((_SENT, sa.func.length(_messages.c.content)), else_=0).label("used"),
    )
    .where(_messages.c.id == _REPLY_PARENT)
    .cte("ancestors", recursive=True)
)
_ANCESTORS = _ANCESTORS.union_all(
    sa.select(
        _ANCESTORS.c.parent_id,
        _parent_column(_ANCESTORS, "parent_id"),
        _ANCESTORS.c.used
        + sa.select(sa.case((_SENT_UP, sa.func.length(_up.c.content)), else_=0))
        .where(_up.c.id == _ANCESTORS.c.parent_id)
        .scalar_subquery(),
    ).where(_ANCESTORS.c.parent_id.is_not(None), _ANCESTORS.c.used <= sa.bindparam("max_chars", type_=sa.Integer))
)
_HISTORY = (
    sa.select(_messages.c.role, _messages.c.content)
    .select_from(_messages.join(_ANCESTORS, _messages.c.id == _ANCESTORS.c.id))
    .where(_SENT)
    .order_by(_messages.c.id.desc())
)


def _history_newest_first(reply_id: int, max_chars: int) -> Iterator[dict]:
    for row in db.session.execute(_HISTORY, {"reply_id": reply_id, "max_chars": max_chars}):
        yield {"role": row.role.value, "content": row.content}


def reply_history(reply_id: int, max_chars: int | None = None) -> tuple[int, list[dict]] | None:
    """Plain data the bot needs: the reply's attempt and the newest messages before it that
    fit in ``max_chars`` characters (default: BOT_HISTORY_MAX_CHARS), oldest first; None if
    the reply is not pending."""
    reply = db.session.execute(_REPLY_TO_CLAIM, {"reply_id": reply_id}).first()
    if reply is None or reply.status is not Status.PENDING:
        return None
    if max_chars is None:
        max_chars = current_app.config["BOT_HISTORY_MAX_CHARS"]
    return reply.attempt, history_before(reply_id, max_chars)


def history_before(reply_id: int, max_chars: int) -> list[dict]:
    """The newest messages before the reply that fit in ``max_chars`` characters, oldest
    first (reply_history without its check that the reply is pending): one query."""
    return fit_history(_history_newest_first(reply_id, max_chars), max_chars)


# Matches no row once the reply was restarted (attempt), stopped or finished (status),
# deleted, or claimed by another process (lease), so a writer that lost its reply cannot
# touch it.
_UPDATE_ACTIVE_ATTEMPT = sa.update(_messages).where(
    _messages.c.id == sa.bindparam("reply_id"),
    _messages.c.attempt == sa.bindparam("active_attempt"),
    _messages.c.status.in_(ACTIVE_STATUSES),
)
_REPLY_TEXT_AND_STATUS = {
    "content": _messages.c.content + sa.bindparam("text", type_=sa.Text),
    "status": sa.bindparam("new_status", type_=_messages.c.status.type),
    "error": sa.bindparam("new_error", type_=sa.Text),
    "updated_at": sa.bindparam("now", type_=_messages.c.updated_at.type),
}
# The lease holder's write; and a write to a reply nobody holds (seeding, scripts).
_APPEND_AS_OWNER = _UPDATE_ACTIVE_ATTEMPT.where(_messages.c.lease_owner == sa.bindparam("owner")).values(
    **_REPLY_TEXT_AND_STATUS
)
_APPEND_UNCLAIMED = _UPDATE_ACTIVE_ATTEMPT.where(_messages.c.lease_owner.is_(None)).values(**_REPLY_TEXT_AND_STATUS)


def _write_reply(reply_id: int, attempt: int, text: str, status: Status, error: str | None, owner: str | None) -> bool:
    params = {
        "reply_id": reply_id,
        "active_attempt": attempt,
        "text": text,
        "new_status": status,
        "new_error": error,
        "now": utcnow(),
    }
    if owner is None:
        result = db.session.execute(_APPEND_UNCLAIMED, params)
    else:
        result = db.session.execute(_APPEND_AS_OWNER, {**params, "owner": owner})
    return cast(sa.CursorResult, result).rowcount == 1


def append_to_reply(reply_id: int, attempt: int, text: str, owner: str | None = None) -> bool:
    """Append generated text as the lease ``owner`` (None: a reply nobody holds); False if
    the reply was restarted, stopped, deleted or taken over meanwhile."""
    return _write_reply(reply_id, attempt, text, Status.STREAMING, None, owner)


def finish_reply(reply_id: int, attempt: int, text: str, error: str | None = None, owner: str | None = None) -> bool:
    """Append the last text and end the reply as complete, or failed with an error."""
    return _write_reply(reply_id, attempt, text, Status.FAILED if error else Status.COMPLETE, error, owner)


def get_reply_progress(conversation_id: int, reply_id: int, offset: int) -> dict:
    """A reply of the conversation, as read_reply_progress() gives it; NotFound if there is none."""
    progress = read_reply_progress(reply_id, offset, conversation_id)
    if progress is None:
        raise NotFound("reply not found in this conversation", code="message_not_found")
    return progress


_REPLY_PROGRESS = sa.select(
    sa.func.substr(_messages.c.content, sa.bindparam("start", type_=sa.Integer)).label("delta"),
    sa.func.length(_messages.c.content).label("length"),
    _messages.c.status,
    _messages.c.error,
    _messages.c.attempt,
).where(_messages.c.id == sa.bindparam("reply_id"))
_CONVERSATION_REPLY_PROGRESS = _REPLY_PROGRESS.where(
    _messages.c.conversation_id == sa.bindparam("conversation_id"),
    _messages.c.role == Role.ASSISTANT,
)


def read_reply_progress(reply_id: int, offset: int, conversation_id: int | None = None) -> dict | None:
    """The reply's text from ``offset`` (characters) on, its status and attempt, as plain data.

    With ``conversation_id``, only a reply (assistant message) of that conversation is found.
    """
    params = {"reply_id": reply_id, "start": offset + 1}
    query = _REPLY_PROGRESS
    if conversation_id is not None:
        query, params["conversation_id"] = _CONVERSATION_REPLY_PROGRESS, conversation_id
    row = db.session.execute(query, params).first()
    if row is None:
        return None
    return {
        "delta": row.delta or "",
        "length": row.length or 0,
        "status": row.status.value,
        "error": row.error,
        "attempt": row.attempt,
    }
