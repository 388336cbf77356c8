"""Accounts, the API tokens that act for them, and the browsers logged in to them."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, WriteOnlyMapped, mapped_column, relationship

from chatapp.db import Model, UTCDateTime, utcnow

if TYPE_CHECKING:
    from chatapp.chat.models import Conversation


class User(Model):
    __tablename__ = "users"
    # Usernames are stored as typed and unique regardless of case: "Alice" and "alice" are one
    # name, so one cannot pose as the other. Lookups compare lower(username) (ASCII only, the
    # one alphabet usernames allow), which this index serves on SQLite and PostgreSQL alike.
    __table_args__ = (sa.Index("uq_users_username_lower", sa.func.lower(sa.column("username")), unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(sa.String(40), unique=True)
    password_hash: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    # Unbounded collections are never loaded whole; query them with select().
    tokens: WriteOnlyMapped[ApiToken] = relationship(back_populates="user", passive_deletes=True)
    conversations: WriteOnlyMapped[Conversation] = relationship(back_populates="owner", passive_deletes=True)
    login_sessions: WriteOnlyMapped[LoginSession] = relationship(back_populates="user", passive_deletes=True)

    # Flask-Login's user protocol, without its mixin's extra surface.
    is_authenticated = True
    is_active = True
    is_anonymous = False
    # Not a column: the token of the login session this object was logged in or loaded
    # with (chatapp.auth.login_sessions). Flask-Login keeps get_id() in the session cookie,
    # so the cookie names a login session, which logging out deletes, not the user, whose
    # id would let any copy of the cookie in for as long as its signature is valid.
    if TYPE_CHECKING:  # an annotation in the class body would make SQLAlchemy map it
        login_token: str | None
    login_token = None

    def get_id(self) -> str:
        if self.login_token is None:
            raise RuntimeError("log in through chatapp.auth.login_sessions.start(), never by user id")
        return self.login_token

    def __repr__(self) -> str:
        return f"<User {self.id} {self.username!r}>"


class ApiToken(Model):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # SHA-256 of the token; the token itself is shown once and never stored.
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    # The first characters of the token, so a user can tell tokens apart.
    prefix: Mapped[str] = mapped_column(sa.String(16))
    name: Mapped[str] = mapped_column(sa.String(100), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(back_populates="tokens")

    def __repr__(self) -> str:
        return f"<ApiToken {self.id} {self.prefix}… user={self.user_id}>"


class LoginSession(Model):
    """One browser's login. Its cookie holds a random token; only the token's SHA-256 is stored,
    and deleting the row (logout, "log out everywhere") ends the login wherever the cookie is."""

    __tablename__ = "login_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A hint for people, written at most every few minutes (login_sessions.TOUCH_INTERVAL).
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # What the settings page shows so that people can tell their browsers apart.
    user_agent: Mapped[str] = mapped_column(sa.String(200), default="")
    ip_address: Mapped[str] = mapped_column(sa.String(45), default="")

    user: Mapped[User] = relationship(back_populates="login_sessions")

    def __repr__(self) -> str:
        return f"<LoginSession {self.id} user={self.user_id}>"
