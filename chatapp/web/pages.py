"""What templates get: plain, frozen data read in the view's session, and how pages render.

Templates never see ORM objects (besides Flask-Login's current user, loaded before any
template renders), so nothing can lazy-load while a page renders or after the session ends.
A page renders once its data is loaded and the transaction has ended (``render_page``):
the template, and the Markdown of replies it shows, run holding no connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property

import sqlalchemy as sa
from flask import current_app, render_template, request
from flask_login import current_user
from markupsafe import Markup

from chatapp.auth import login_sessions as sessions
from chatapp.auth import services as auth
from chatapp.chat import catalog
from chatapp.chat import services as chat
from chatapp.chat.models import ACTIVE_STATUSES, Conversation, Message, Role
from chatapp.db import db, end_transaction
from chatapp.errors import NotFound
from chatapp.web.markdown import render_markdown, render_streaming_markdown


@dataclass(frozen=True)
class ConversationItem:
    id: int
    title: str
    updated_at: datetime

    @property
    def updated_iso(self) -> str:
        """``updated_at`` in ISO 8601 with its UTC offset, for the page script's date groups."""
        moment = self.updated_at if self.updated_at.tzinfo else self.updated_at.replace(tzinfo=UTC)
        return moment.isoformat(timespec="seconds")


@dataclass(frozen=True)
class Sidebar:
    conversations: list[ConversationItem]
    older_cursor: str | None
    is_first_page: bool
    active_id: int | None
    # The cursor of this page (None on the first): links to conversations carry it, so
    # opening one from page 2 keeps the sidebar on page 2.
    cursor: str | None = None

    def groups(self, today: date | None = None) -> list[tuple[str, list[ConversationItem]]]:
        """The conversations under date headings, by ``updated_at`` in UTC.

        The server does not know the user's timezone: this is the page without a script;
        app.js regroups the same entries by the browser's own dates.
        """
        today = today or datetime.now(UTC).date()
        groups: list[tuple[str, list[ConversationItem]]] = []
        for item in self.conversations:
            label = date_group(_utc_date(item.updated_at), today)
            if groups and groups[-1][0] == label:
                groups[-1][1].append(item)
            else:
                groups.append((label, [item]))
        return groups


def _utc_date(moment: datetime) -> date:
    # SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones.
    return (moment if moment.tzinfo is None else moment.astimezone(UTC)).date()


def date_group(day: date, today: date) -> str:
    """The sidebar heading of a day (the same rules as app.js's dateGroup)."""
    age = (today - day).days
    if age <= 0:
        return "Today"
    if age == 1:
        return "Yesterday"
    if age <= 7:
        return "Previous 7 days"
    if age <= 30:
        return "Previous 30 days"
    return day.strftime("%B") if day.year == today.year else day.strftime("%B %Y")


@dataclass(frozen=True)
class Versions:
    """Where a message stands among its versions (edits, regenerated replies): the ‹ 2/3 › switcher."""

    index: int
    count: int
    previous_id: int | None
    next_id: int | None


ONLY_VERSION = Versions(1, 1, None, None)


@dataclass(frozen=True)
class MessageItem:
    id: int
    role: str
    status: str
    content: str
    error: str | None
    is_latest: bool
    # Assistant replies show as Markdown, a reply being generated too (its text so far).
    is_markdown: bool
    versions: Versions = ONLY_VERSION
    model: str | None = None  # the model a reply was written by

    @property
    def is_active(self) -> bool:
        return self.status in {status.value for status in ACTIVE_STATUSES}

    @cached_property
    def html(self) -> Markup | None:
        """Sanitized Markdown, rendered when the template asks: after the transaction ended."""
        if not self.is_markdown:
            return None
        return render_streaming_markdown(self.content) if self.is_active else render_markdown(self.content)


# The stand-in the page's blank user message is rendered from (the page script fills it in).
BLANK_USER_MESSAGE = MessageItem(0, "user", "complete", "", None, is_latest=False, is_markdown=False)


@dataclass(frozen=True)
class ReplyText:
    """A reply's text so far, which the page shows, rendered, while the reply streams."""

    content: str
    is_active: bool

    @cached_property
    def html(self) -> Markup:
        """Rendered when the template asks (after the transaction ended), as the finished reply will be."""
        return render_streaming_markdown(self.content) if self.is_active else render_markdown(self.content)


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
    items = [conversation_item(row) for row in page.items]
    return Sidebar(items, page.next_cursor, not cursor, active_id, cursor or None)


def current_sidebar(active_id: int | None = None) -> Sidebar:
    """The sidebar of a signed-in page: the page of the user's conversations its ``?older=`` asks for."""
    per_page = current_app.config["WEB_CONVERSATIONS_PER_PAGE"]
    return sidebar(current_user.id, per_page, request.args.get("older"), active_id)


def message_item(message: Message | chat.BranchMessage, is_latest: bool, siblings: dict | None = None) -> MessageItem:
    status = message.status.value
    return MessageItem(
        id=message.id,
        role=message.role.value,
        status=status,
        content=message.content,
        error=message.error,
        is_latest=is_latest,
        is_markdown=message.role is Role.ASSISTANT,
        versions=Versions(**siblings) if siblings else ONLY_VERSION,
        model=message.model,
    )


def history(conversation_id: int, per_page: int, before: int | None = None) -> History:
    """The newest messages of the current branch (or those before ``before``), oldest first."""
    rows = chat.newest_of_branch(conversation_id, per_page + 1, before)
    earlier = None
    if len(rows) > per_page:
        rows = rows[:per_page]
        earlier = rows[-1].id
    rows.reverse()
    # Only the last message of the newest page is the conversation's latest.
    latest_id = rows[-1].id if rows and before is None else None
    return History([message_item(row, row.id == latest_id, row.siblings) for row in rows], earlier)


def reply_item(conversation: Conversation, reply_id: int) -> MessageItem:
    """One assistant reply of the conversation (NotFound otherwise), as the page shows it."""
    reply = chat.get_reply(conversation, reply_id)
    (siblings,) = chat.sibling_info(conversation.id, [reply])
    return message_item(reply, reply.id == conversation.current_leaf_id, siblings)


def user_message(conversation: Conversation, message_id: int) -> MessageItem:
    """One of the user's messages in the conversation (NotFound otherwise), for its edit form."""
    message = db.session.scalar(
        sa.select(Message).where(
            Message.id == message_id, Message.conversation_id == conversation.id, Message.role == Role.USER
        )
    )
    if message is None:
        raise NotFound("message not found in this conversation", code="message_not_found")
    return message_item(message, False)


def reply_text(owner_id: int, conversation_id: int, reply_id: int) -> ReplyText:
    """A reply's stored text and whether it is still being written (NotFound if not the owner's reply)."""
    chat.check_conversation(owner_id, conversation_id)
    progress = chat.get_reply_progress(conversation_id, reply_id, 0)
    return ReplyText(progress["delta"], progress["status"] in {status.value for status in ACTIVE_STATUSES})


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
