"""Conversation and message rules. Services add and flush; the caller commits."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from chatapp.chat.models import ACTIVE_STATUSES, Conversation, Message, Role, Status
from chatapp.db import db, utcnow
from chatapp.errors import Conflict, InvalidInput, NotFound

TITLE_MAX = 200
CONTENT_MAX = 32_000
DEFAULT_TITLE = "New chat"
INTERRUPTED_ERROR = "interrupted; regenerate to retry"


@dataclass(frozen=True)
class Page:
    items: list
    next_cursor: str | None


# --- cursors -----------------------------------------------------------------


def _encode_cursor(*parts: object) -> str:
    raw = "|".join(str(part) for part in parts).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, count: int) -> list[str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidInput("cursor is not valid; use next_cursor from a previous page", field="cursor") from None
    parts = raw.split("|")
    if len(parts) != count:
        raise InvalidInput("cursor is not valid; use next_cursor from a previous page", field="cursor")
    return parts


# --- conversations ------------------------------------------------------------


def validate_title(title: object) -> str:
    if not isinstance(title, str) or not title.strip() or len(title) > TITLE_MAX:
        raise InvalidInput(f"title must be 1-{TITLE_MAX} characters", field="title")
    return title.strip()


def create_conversation(owner_id: int, title: object = None) -> Conversation:
    conversation = Conversation(
        owner_id=owner_id, title=DEFAULT_TITLE if title is None else validate_title(title)
    )
    db.session.add(conversation)
    db.session.flush()
    return conversation


def get_conversation(owner_id: int, conversation_id: int) -> Conversation:
    """The owner's conversation; someone else's is NotFound, so existence is never revealed."""
    conversation = db.session.scalar(
        sa.select(Conversation).where(
            Conversation.id == conversation_id, Conversation.owner_id == owner_id
        )
    )
    if conversation is None:
        raise NotFound("conversation not found", code="conversation_not_found")
    return conversation


def rename_conversation(conversation: Conversation, title: object) -> Conversation:
    conversation.title = validate_title(title)
    conversation.updated_at = utcnow()
    db.session.flush()
    return conversation


def delete_conversation(conversation: Conversation) -> None:
    # Messages go with it through ON DELETE CASCADE in the database.
    db.session.delete(conversation)
    db.session.flush()


def list_conversations(owner_id: int, limit: int, cursor: str | None = None) -> Page:
    """A user's conversations, most recently updated first."""
    query = sa.select(Conversation).where(Conversation.owner_id == owner_id)
    if cursor:
        stamp, last_id = _decode_cursor(cursor, 2)
        try:
            after = (datetime.fromisoformat(stamp), int(last_id))
        except ValueError:
            raise InvalidInput("cursor is not valid; use next_cursor from a previous page", field="cursor") from None
        query = query.where(
            sa.tuple_(Conversation.updated_at, Conversation.id) < sa.tuple_(*after)
        )
    rows = list(
        db.session.scalars(
            query.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit + 1)
        )
    )
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = _encode_cursor(last.updated_at.isoformat(), last.id)
    return Page(rows, next_cursor)


# --- messages -------------------------------------------------------------------


def validate_content(content: object) -> str:
    if not isinstance(content, str) or not content.strip() or len(content) > CONTENT_MAX:
        raise InvalidInput(f"content must be 1-{CONTENT_MAX} characters", field="content")
    return content


def list_messages(conversation_id: int, limit: int, cursor: str | None = None) -> Page:
    """A conversation's messages, oldest first."""
    query = sa.select(Message).where(Message.conversation_id == conversation_id)
    if cursor:
        (last_id,) = _decode_cursor(cursor, 1)
        if not last_id.isdigit():
            raise InvalidInput("cursor is not valid; use next_cursor from a previous page", field="cursor")
        query = query.where(Message.id > int(last_id))
    rows = list(db.session.scalars(query.order_by(Message.id).limit(limit + 1)))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1].id)
    return Page(rows, next_cursor)


def _reply_in_progress(conversation_id: int) -> bool:
    return (
        db.session.scalar(
            sa.select(Message.id)
            .where(Message.conversation_id == conversation_id, Message.status.in_(ACTIVE_STATUSES))
            .limit(1)
        )
        is not None
    )


def post_message(conversation: Conversation, content: object) -> tuple[Message, Message]:
    """Add the user's message and a pending assistant reply; the caller commits, then starts the reply."""
    content = validate_content(content)
    if _reply_in_progress(conversation.id):
        raise Conflict(
            "the bot is still answering in this conversation; wait for the reply to finish",
            code="reply_in_progress",
        )
    now = utcnow()
    message = Message(
        conversation_id=conversation.id, role=Role.USER, content=content,
        status=Status.COMPLETE, created_at=now, updated_at=now,
    )
    reply = Message(
        conversation_id=conversation.id, role=Role.ASSISTANT, content="",
        status=Status.PENDING, created_at=now, updated_at=now,
    )
    db.session.add_all([message, reply])
    conversation.updated_at = now
    db.session.flush()
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
        raise Conflict(
            "this reply is still being generated; wait for it to finish", code="reply_in_progress"
        )
    newer = db.session.scalar(
        sa.select(Message.id)
        .where(Message.conversation_id == conversation.id, Message.id > reply.id)
        .limit(1)
    )
    if newer is not None:
        raise Conflict(
            "only the latest reply in a conversation can be regenerated", code="not_latest_reply"
        )
    reply.content = ""
    reply.error = None
    reply.status = Status.PENDING
    reply.attempt += 1
    reply.updated_at = utcnow()
    conversation.updated_at = reply.updated_at
    db.session.flush()
    return reply


# --- the reply pipeline's writes (each called inside its own short unit of work) ---------


def reply_history(reply_id: int) -> tuple[int, list[dict]] | None:
    """Plain data the bot needs: the reply's attempt and the messages before it; None if not pending."""
    reply = db.session.get(Message, reply_id)
    if reply is None or reply.status is not Status.PENDING:
        return None
    rows = db.session.execute(
        sa.select(Message.role, Message.content)
        .where(
            Message.conversation_id == reply.conversation_id,
            Message.id < reply.id,
            Message.status == Status.COMPLETE,
        )
        .order_by(Message.id)
    )
    return reply.attempt, [{"role": role.value, "content": content} for role, content in rows]


def _update_active_attempt(reply_id: int, attempt: int) -> sa.Update:
    # Matches no row once the reply was restarted (attempt), reaped or finished (status)
    # or deleted, so a writer that lost its reply cannot touch it.
    return sa.update(Message).where(
        Message.id == reply_id, Message.attempt == attempt, Message.status.in_(ACTIVE_STATUSES)
    )


def append_to_reply(reply_id: int, attempt: int, text: str) -> bool:
    """Append generated text; False if the reply was restarted, reaped or deleted meanwhile."""
    result = db.session.execute(
        _update_active_attempt(reply_id, attempt)
        .values(content=Message.content + text, status=Status.STREAMING, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def finish_reply(reply_id: int, attempt: int, text: str, error: str | None = None) -> bool:
    """Append the last text and end the reply as complete, or failed with an error."""
    result = db.session.execute(
        _update_active_attempt(reply_id, attempt)
        .values(
            content=Message.content + text,
            status=Status.FAILED if error else Status.COMPLETE,
            error=error,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def reap_stale_replies(stale_after: float) -> int:
    """Fail replies that made no progress for stale_after seconds (their process died)."""
    cutoff = utcnow() - timedelta(seconds=stale_after)
    result = db.session.execute(
        sa.update(Message)
        .where(Message.status.in_(ACTIVE_STATUSES), Message.updated_at < cutoff)
        .values(status=Status.FAILED, error=INTERRUPTED_ERROR, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def read_reply_progress(reply_id: int, offset: int) -> dict | None:
    """The reply's text from ``offset`` (characters) on, its status and attempt, as plain data."""
    row = db.session.execute(
        sa.select(
            sa.func.substr(Message.content, offset + 1).label("delta"),
            sa.func.length(Message.content).label("length"),
            Message.status,
            Message.error,
            Message.attempt,
        ).where(Message.id == reply_id)
    ).one_or_none()
    if row is None:
        return None
    return {
        "delta": row.delta or "",
        "length": row.length or 0,
        "status": row.status.value,
        "error": row.error,
        "attempt": row.attempt,
    }
