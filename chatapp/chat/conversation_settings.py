"""A conversation's model, system prompt and generated title, as the reply pipeline and the
title job read and write them: Core statements on plain columns, run inside their caller's
short unit of work. Services add and flush; these only execute."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import sqlalchemy as sa

from chatapp.chat.models import Conversation, Message, Role, Status
from chatapp.db import db

_conversations, _messages = cast(sa.Table, Conversation.__table__), cast(sa.Table, Message.__table__)


@dataclass(frozen=True)
class ReplySettings:
    """What a reply run needs of its conversation, as plain values."""

    conversation_id: int
    model: str  # the effective model: the conversation's, else the engine's default
    system_prompt: str | None  # the conversation's; None: the engine's configured one
    needs_title: bool  # its title is still the default one


def from_claim(claimed: sa.Row, default_model: str) -> ReplySettings:
    """The settings the reply's claim returned with it (leases.claim_run)."""
    return ReplySettings(
        claimed.conversation_id,
        claimed.model or default_model,
        claimed.system_prompt,
        claimed.title_source == "default",
    )


@dataclass(frozen=True)
class TitleSource:
    """What the title job sends the engine: the first exchange, and the model."""

    model: str | None
    first_message: str
    first_reply: str


_TITLE_STATE = sa.select(_conversations.c.title_source, _conversations.c.model).where(
    _conversations.c.id == sa.bindparam("conversation_id")
)


def _first(role: Role):
    return (
        sa.select(_messages.c.content)
        .where(
            _messages.c.conversation_id == sa.bindparam("conversation_id"),
            _messages.c.role == role,
            _messages.c.status == Status.COMPLETE,
            _messages.c.content != "",
        )
        .order_by(_messages.c.id)
        .limit(1)
    )


_FIRST_MESSAGE, _FIRST_REPLY = _first(Role.USER), _first(Role.ASSISTANT)


def title_source(conversation_id: int) -> TitleSource | None:
    """The first exchange of a conversation whose title is still the default; None otherwise."""
    params = {"conversation_id": conversation_id}
    state = db.session.execute(_TITLE_STATE, params).first()
    if state is None or state.title_source != "default":
        return None
    first_message = db.session.execute(_FIRST_MESSAGE, params).scalar()
    if first_message is None:
        return None
    first_reply = db.session.execute(_FIRST_REPLY, params).scalar() or ""
    return TitleSource(state.model, first_message, first_reply)


# Only over a default title: a rename that committed first (title_source "user") wins.
_SET_AUTO_TITLE = (
    sa.update(_conversations)
    .where(_conversations.c.id == sa.bindparam("conversation_id"), _conversations.c.title_source == "default")
    .values(title=sa.bindparam("title"), title_source="auto")
)


def set_generated_title(conversation_id: int, title: str) -> bool:
    """Store a generated title unless the conversation was renamed meanwhile; True if stored."""
    result = db.session.execute(_SET_AUTO_TITLE, {"conversation_id": conversation_id, "title": title})
    return cast(sa.CursorResult, result).rowcount == 1
