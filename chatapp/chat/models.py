"""Conversations and their messages."""

from __future__ import annotations

import enum
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, WriteOnlyMapped, mapped_column, relationship

from chatapp.auth.models import User
from chatapp.db import Model, UTCDateTime, utcnow


class Role(str, enum.Enum):  # noqa: UP042 - StrEnum's str() and format() differ
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


class Status(str, enum.Enum):  # noqa: UP042 - StrEnum's str() and format() differ
    PENDING = "pending"
    STREAMING = "streaming"
    COMPLETE = "complete"
    FAILED = "failed"
    # Ended early by its user, keeping the text generated so far.
    STOPPED = "stopped"


ACTIVE_STATUSES = (Status.PENDING, Status.STREAMING)
# The same predicate as literal SQL, for the partial indexes below (both dialects read it)
# and for queries that must match their predicate to use them.
ACTIVE_SQL = sa.text("status IN ('pending', 'streaming')")


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


class Conversation(Model):
    __tablename__ = "conversations"
    __table_args__ = (
        # The sidebar and GET /conversations: a user's conversations, newest first.
        sa.Index("ix_conversations_owner_updated", "owner_id", "updated_at", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(sa.String(200))
    # Who set the title: "default" (New chat), "auto" (generated after the first reply) or
    # "user" (renamed). A generated title is written only over a default one, so a rename
    # racing the title job wins.
    title_source: Mapped[str] = mapped_column(sa.String(16), default="default", server_default="default")
    # The model its replies use (None: the server's default) and its system prompt (None: the
    # server's OPENAI_SYSTEM_PROMPT), chosen when it starts and changeable later.
    model: Mapped[str | None] = mapped_column(sa.String(200))
    system_prompt: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The end of the branch the conversation shows and continues (messages form a tree:
    # an edit or a regenerated reply starts a sibling). None until the first message.
    # use_alter: conversations and messages refer to each other.
    current_leaf_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey(
            "messages.id",
            ondelete="SET NULL",
            use_alter=True,
            name="fk_conversations_current_leaf_id_messages",
        )
    )

    owner: Mapped[User] = relationship(back_populates="conversations")
    messages: WriteOnlyMapped[Message] = relationship(
        back_populates="conversation",
        passive_deletes=True,
        order_by="Message.id",
        foreign_keys="Message.conversation_id",
    )

    def __repr__(self) -> str:
        return f"<Conversation {self.id} owner={self.owner_id} {self.title!r}>"


class Message(Model):
    __tablename__ = "messages"
    __table_args__ = (
        # A conversation's messages in id order (history, paging, the stream).
        sa.Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        # At most one reply being generated per conversation, enforced by the database:
        # of two concurrent posts, the second's INSERT fails instead of both passing a
        # read-then-insert check. Partial, so it also indexes just the few active replies
        # that the lease sweep scans.
        sa.Index(
            "uq_messages_one_active_reply",
            "conversation_id",
            unique=True,
            sqlite_where=ACTIVE_SQL,
            postgresql_where=ACTIVE_SQL,
        ),
        # A client's retry of a message it may already have sent (Idempotency-Key).
        sa.Index("uq_messages_idempotency_key", "conversation_id", "idempotency_key", unique=True),
        # A message's children (siblings, the way down to a leaf); the roots of a conversation
        # (parent_id IS NULL, then conversation_id); and the ON DELETE CASCADE of parent_id.
        sa.Index("ix_messages_parent_id", "parent_id", "conversation_id", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(sa.ForeignKey("conversations.id", ondelete="CASCADE"))
    # The message this one follows in its branch; None for a conversation's first message
    # (and its edited versions). Ids grow down every branch: a child is newer than its parent.
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("messages.id", ondelete="CASCADE"))
    role: Mapped[Role] = mapped_column(_enum_column(Role, "message_role"))
    content: Mapped[str] = mapped_column(sa.Text, default="")
    status: Mapped[Status] = mapped_column(_enum_column(Status, "message_status"), default=Status.COMPLETE)
    error: Mapped[str | None] = mapped_column(sa.Text)
    # Bumped when a reply is (re)started; writers from an older attempt match no row.
    attempt: Mapped[int] = mapped_column(default=0)
    # The lease of the process generating this reply ("host:pid:nonce"), renewed while it
    # runs; an expired lease means the process died or lost the database, and any live
    # process may claim the reply and run it again as a new attempt.
    lease_owner: Mapped[str | None] = mapped_column(sa.String(80))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Runs of this reply since it was last (re)started: an interrupted run counts, a run
    # handed over by a worker shutting down does not. Bounded by REPLY_MAX_RUNS.
    runs: Mapped[int] = mapped_column(default=0)
    # A user message's Idempotency-Key: a retried POST returns this message and its reply.
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(100))
    # A reply's model, recorded when a run claims it (a regenerated reply may change it).
    model: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages", foreign_keys=[conversation_id])

    def __repr__(self) -> str:
        return f"<Message {self.id} {self.role.value} {self.status.value}>"
