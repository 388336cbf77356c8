"""Conversation and message rules. Services add and flush; the caller commits."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Sequence
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


# Rows with exactly the attributes MessageOut reads.
_MESSAGE_PAGE = (
    sa.select(
        _messages.c.id,
        _messages.c.conversation_id,
        _messages.c.role,
        _messages.c.content,
        _messages.c.status,
        _messages.c.error,
        _messages.c.created_at,
        _messages.c.updated_at,
        _messages.c.model,
    )
    .where(_messages.c.conversation_id == sa.bindparam("conversation_id"))
    .order_by(_messages.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer))
)
_MESSAGE_PAGE_AFTER = _MESSAGE_PAGE.where(_messages.c.id > sa.bindparam("after_id", type_=sa.Integer))


def list_messages(
    conversation_id: int, limit: int, cursor: str | None = None, connection: sa.Connection | None = None
) -> Page:
    """A conversation's messages, oldest first, as plain rows with MessageOut's attributes
    (Core on the session's connection, as check_conversation)."""
    params = {"conversation_id": conversation_id, "limit": limit + 1}
    query = _MESSAGE_PAGE
    if cursor:
        (last_id,) = _decode_cursor(cursor, 1)
        params["after_id"] = _cursor_id(last_id)
        query = _MESSAGE_PAGE_AFTER
    connection = connection if connection is not None else db.session.connection()
    rows = connection.execute(query, params).all()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1].id)
    return Page(rows, next_cursor)


_ACTIVE_REPLY = (
    sa.select(_messages.c.id)
    .where(
        _messages.c.conversation_id == sa.bindparam("conversation_id"),
        _messages.c.status.in_(ACTIVE_STATUSES),
    )
    .limit(1)
)
_INSERT_MESSAGE = sa.insert(_messages)
_TOUCH_CONVERSATION = (
    sa.update(_conversations)
    .where(_conversations.c.id == sa.bindparam("conversation_id"))
    .values(updated_at=sa.bindparam("now"))
)


def _reply_in_progress(conversation_id: int) -> bool:
    return db.session.execute(_ACTIVE_REPLY, {"conversation_id": conversation_id}).first() is not None


@dataclass(frozen=True)
class NewMessage:
    """A message just written, as plain values: the columns of Message, no ORM object."""

    id: int
    conversation_id: int
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
    role: Role,
    content: str,
    status: Status,
    now: datetime,
    idempotency_key: str | None = None,
) -> NewMessage:
    values: dict[str, Any] = {
        "conversation_id": conversation_id,
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
            # The user's message first: ids order a conversation, and the reply comes after it.
            message = _insert_message(conversation_id, Role.USER, content, Status.COMPLETE, now, idempotency_key)
            reply = _insert_message(conversation_id, Role.ASSISTANT, "", Status.PENDING, now)
    except sa.exc.IntegrityError:
        if idempotency_key is not None:
            earlier = _sent_with_key(conversation_id, idempotency_key, content)
            if earlier is not None:
                return (*earlier, False)
        raise _reply_in_progress_error() from None
    db.session.execute(_TOUCH_CONVERSATION, {"conversation_id": conversation_id, "now": now})
    return message, reply, True


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
    reply = db.session.scalar(
        sa.select(Message)
        .where(
            Message.conversation_id == conversation_id,
            Message.id > message.id,
            Message.role == Role.ASSISTANT,
        )
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


def restart_reply(conversation: Conversation, reply: Message) -> Message:
    """Clear a finished or failed reply and make it pending again, as a new attempt."""
    if reply.status in ACTIVE_STATUSES:
        raise Conflict("this reply is still being generated; wait for it to finish", code="reply_in_progress")
    newer = db.session.scalar(
        sa.select(Message.id).where(Message.conversation_id == conversation.id, Message.id > reply.id).limit(1)
    )
    if newer is not None:
        raise Conflict("only the latest reply in a conversation can be regenerated", code="not_latest_reply")
    reply.content = ""
    reply.error = None
    reply.status = Status.PENDING
    reply.attempt += 1
    reply.runs = 0
    reply.lease_owner = None
    reply.lease_expires_at = None
    reply.updated_at = utcnow()
    conversation.updated_at = reply.updated_at
    try:
        with db.session.begin_nested():
            db.session.flush()
    except sa.exc.IntegrityError:
        # Another reply of this conversation started meanwhile (the one-active-reply index).
        raise _reply_in_progress_error() from None
    return reply


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
# The history before a reply, newest first, a page at a time (keyset on id): a reply reads
# only as far back as its budget reaches, not the whole conversation. A stopped reply's
# text is what its user saw, so the bot sees it too; a failed one is left out.
HISTORY_PAGE_ROWS = 50
_HISTORY_PAGE = (
    sa.select(_messages.c.id, _messages.c.role, _messages.c.content)
    .where(
        _messages.c.conversation_id == sa.bindparam("conversation_id"),
        _messages.c.id < sa.bindparam("before_id"),
        _messages.c.status.in_((Status.COMPLETE, Status.STOPPED)),
        _messages.c.content != "",
    )
    .order_by(_messages.c.id.desc())
    .limit(HISTORY_PAGE_ROWS)
)


def _history_newest_first(conversation_id: int, reply_id: int) -> Iterator[dict]:
    before_id = reply_id
    while True:
        rows = db.session.execute(_HISTORY_PAGE, {"conversation_id": conversation_id, "before_id": before_id}).all()
        for row in rows:
            yield {"role": row.role.value, "content": row.content}
        if len(rows) < HISTORY_PAGE_ROWS:
            return
        before_id = rows[-1].id


def reply_history(reply_id: int, max_chars: int | None = None) -> tuple[int, list[dict]] | None:
    """Plain data the bot needs: the reply's attempt and the newest messages before it that
    fit in ``max_chars`` characters (default: BOT_HISTORY_MAX_CHARS), oldest first; None if
    the reply is not pending."""
    reply = db.session.execute(_REPLY_TO_CLAIM, {"reply_id": reply_id}).first()
    if reply is None or reply.status is not Status.PENDING:
        return None
    if max_chars is None:
        max_chars = current_app.config["BOT_HISTORY_MAX_CHARS"]
    return reply.attempt, fit_history(_history_newest_first(reply.conversation_id, reply_id), max_chars)


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
