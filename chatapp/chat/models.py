"""Conversations and their messages."""

from __future__ import annotations

import enum
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, WriteOnlyMapped, mapped_column, relationship

from chatapp.auth.models import User
from chatapp.db import UTCDateTime, db, utcnow


class Role(str, enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


class Status(str, enum.Enum):
    PENDING = "pending"
    STREAMING = "streaming"
    COMPLETE = "complete"
    FAILED = "failed"


ACTIVE_STATUSES = (Status.PENDING, Status.STREAMING)


def _enum_column(enum_cls: type[enum.Enum], name: str) -> sa.Enum:
    # Stored as the value ("user", "pending"), checked by a CHECK constraint on every backend.
    return sa.Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Conversation(db.Model):
    __tablename__ = "conversations"
    __table_args__ = (
        # The sidebar and GET /conversations: a user's conversations, newest first.
        sa.Index("ix_conversations_owner_updated", "owner_id", "updated_at", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    owner: Mapped[User] = relationship(back_populates="conversations")
    messages: WriteOnlyMapped["Message"] = relationship(
        back_populates="conversation",
        passive_deletes=True,
        order_by="Message.id",
    )

    def __repr__(self) -> str:
        return f"<Conversation {self.id} owner={self.owner_id} {self.title!r}>"


class Message(db.Model):
    __tablename__ = "messages"
    __table_args__ = (
        # A conversation's messages in id order (history, paging, the stream).
        sa.Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        # The reaper's scan for replies that stopped making progress.
        sa.Index("ix_messages_status_updated", "status", "updated_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        sa.ForeignKey("conversations.id", ondelete="CASCADE")
    )
    role: Mapped[Role] = mapped_column(_enum_column(Role, "message_role"))
    content: Mapped[str] = mapped_column(sa.Text, default="")
    status: Mapped[Status] = mapped_column(
        _enum_column(Status, "message_status"), default=Status.COMPLETE
    )
    error: Mapped[str | None] = mapped_column(sa.Text)
    # Bumped when a reply is (re)started; writers from an older attempt match no row.
    attempt: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")

    def __repr__(self) -> str:
        return f"<Message {self.id} {self.role.value} {self.status.value}>"
