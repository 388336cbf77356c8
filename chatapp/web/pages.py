"""What templates get: plain, frozen data read in the view's session, and how pages render.

Templates never see ORM objects (besides Flask-Login's current user, loaded before any
template renders), so nothing can lazy-load while a page renders or after the session ends.
A page renders once its data is loaded and the transaction has ended (``render_page``):
the template, and the Markdown of replies it shows, run holding no connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

import sqlalchemy as sa
from flask import render_template
from markupsafe import Markup

from chatapp.auth import login_sessions as sessions
from chatapp.auth import services as auth
from chatapp.chat import catalog
from chatapp.chat import services as chat
from chatapp.chat.models import ACTIVE_STATUSES, Conversation, Message, Role
from chatapp.db import db, end_transaction
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
    is_latest: bool
    # Finished assistant replies show as Markdown; a reply being generated shows as text.
    is_markdown: bool
    model: str | None = None  # the model a reply was written by

    @property
    def is_active(self) -> bool:
        return self.status in {status.value for status in ACTIVE_STATUSES}

    @cached_property
    def html(self) -> Markup | None:
        """Sanitized Markdown, rendered when the template asks: after the transaction ended."""
        return render_markdown(self.content) if self.is_markdown else None


@dataclass(frozen=True)
class History:
    messages: list[MessageItem]
    earlier_before: int | None


@dataclass(frozen=True)
class ChatSettings:
    """A conversation's model and system prompt, and the models its picker offers."""

    model: str | None
    system_prompt: str
    models: list[catalog.ModelItem]


def chat_settings(model: str | None, system_prompt: str | None) -> ChatSettings:
    # Never waits for the model server: a page offers what is at hand, its script the rest.
    return ChatSettings(model, system_prompt or "", catalog.models_at_hand(model))


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


def render_page(template: str, **context) -> str:
    """End the request's transaction, then render: no template or Markdown runs inside one."""
    end_transaction()
    return render_template(template, **context)


def conversation_item(conversation: Conversation) -> ConversationItem:
    return ConversationItem(conversation.id, conversation.title, conversation.updated_at)


def sidebar(user_id: int, per_page: int, cursor: str | None, active_id: int | None = None) -> Sidebar:
    """One page of the user's conversations, newest first."""
    page = chat.list_conversations(user_id, per_page, cursor or None)
    return Sidebar([conversation_item(row) for row in page.items], page.next_cursor, not cursor, active_id)


def message_item(message: Message, is_latest: bool) -> MessageItem:
    status = message.status.value
    finished = message.role is Role.ASSISTANT and message.status not in ACTIVE_STATUSES
    return MessageItem(
        id=message.id,
        role=message.role.value,
        status=status,
        content=message.content,
        error=message.error,
        is_latest=is_latest,
        is_markdown=finished,
        model=message.model,
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
    latest_id = db.session.scalar(sa.select(sa.func.max(Message.id)).where(Message.conversation_id == conversation.id))
    return message_item(reply, reply.id == latest_id)


def tokens(user_id: int) -> list[TokenItem]:
    return [
        TokenItem(row.id, row.name, row.prefix, row.created_at, row.last_used_at) for row in auth.list_tokens(user_id)
    ]


def login_sessions(user_id: int, current_id: int | None) -> list[LoginSessionItem]:
    """The user's browser logins, this browser's first, then the most recently seen."""
    items = [
        LoginSessionItem(row.id, row.created_at, row.last_seen_at, row.user_agent, row.ip_address, row.id == current_id)
        for row in sessions.list_sessions(user_id)
    ]
    return sorted(items, key=lambda item: not item.is_current)  # stable: keeps the rest in order
