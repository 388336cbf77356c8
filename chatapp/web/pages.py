"""What templates get: plain, frozen data read in the view's session.

Templates never see ORM objects (besides Flask-Login's current user, loaded before any
template renders), so nothing can lazy-load while a page renders or after the session ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from markupsafe import Markup

from chatapp.auth import login_sessions as sessions
from chatapp.auth import services as auth
from chatapp.chat import services as chat
from chatapp.chat.models import ACTIVE_STATUSES, Conversation, Message, Role
from chatapp.db import db
from chatapp.web.markdown import render_markdown


@dataclass(frozen=True)
class ConversationItem:
    id: int
    title: str
    updated_at: datetime


@dataclass(frozen=True)
class Sidebar:
    conversations: list[ConversationItem]
    older_cursor: str | None
    is_first_page: bool
    active_id: int | None


@dataclass(frozen=True)
class MessageItem:
    id: int
    role: str
    status: str
    content: str
    error: str | None
    # Sanitized Markdown for finished assistant replies; None while a reply is generated.
    html: Markup | None
    is_latest: bool

    @property
    def is_active(self) -> bool:
        return self.status in {status.value for status in ACTIVE_STATUSES}


@dataclass(frozen=True)
class History:
    messages: list[MessageItem]
    earlier_before: int | None


@dataclass(frozen=True)
class TokenItem:
    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True)
class LoginSessionItem:
    id: int
    created_at: datetime
    last_seen_at: datetime
    user_agent: str
    ip_address: str
    is_current: bool


def conversation_item(conversation: Conversation) -> ConversationItem:
    return ConversationItem(conversation.id, conversation.title, conversation.updated_at)


def sidebar(user_id: int, per_page: int, cursor: str | None, active_id: int | None = None) -> Sidebar:
    """One page of the user's conversations, newest first."""
    page = chat.list_conversations(user_id, per_page, cursor or None)
    return Sidebar(
        [conversation_item(row) for row in page.items], page.next_cursor, not cursor, active_id
    )


def message_item(message: Message, is_latest: bool) -> MessageItem:
    status = message.status.value
    finished = message.role is Role.ASSISTANT and message.status not in ACTIVE_STATUSES
    return MessageItem(
        id=message.id,
        role=message.role.value,
        status=status,
        content=message.content,
        error=message.error,
        html=render_markdown(message.content) if finished else None,
        is_latest=is_latest,
    )


def history(conversation_id: int, per_page: int, before: int | None = None) -> History:
    """The newest messages (or those before ``before``), oldest first."""
    query = sa.select(Message).where(Message.conversation_id == conversation_id)
    if before is not None:
        query = query.where(Message.id < before)
    rows = list(db.session.scalars(query.order_by(Message.id.desc()).limit(per_page + 1)))
    earlier = None
    if len(rows) > per_page:
        rows = rows[:per_page]
        earlier = rows[-1].id
    rows.reverse()
    # Only the last message of the newest page is the conversation's latest.
    latest_id = rows[-1].id if rows and before is None else None
    return History([message_item(row, row.id == latest_id) for row in rows], earlier)


def reply_item(conversation: Conversation, reply_id: int) -> MessageItem:
    """One assistant reply of the conversation (NotFound otherwise), as the page shows it."""
    reply = chat.get_reply(conversation, reply_id)
    latest_id = db.session.scalar(
        sa.select(sa.func.max(Message.id)).where(Message.conversation_id == conversation.id)
    )
    return message_item(reply, reply.id == latest_id)


def tokens(user_id: int) -> list[TokenItem]:
    return [
        TokenItem(row.id, row.name, row.prefix, row.created_at, row.last_used_at)
        for row in auth.list_tokens(user_id)
    ]


def login_sessions(user_id: int, current_id: int | None) -> list[LoginSessionItem]:
    """The user's browser logins, this browser's first, then the most recently seen."""
    items = [
        LoginSessionItem(row.id, row.created_at, row.last_seen_at, row.user_agent, row.ip_address,
                         row.id == current_id)
        for row in sessions.list_sessions(user_id)
    ]
    return sorted(items, key=lambda item: not item.is_current)  # stable: keeps the rest in order
