"""Browser login sessions: what the login cookie names, so that logging out ends it on the server.

Flask's session cookie is signed, not stored: on its own, a copy taken before logout would
still log in until its signature expires. So the cookie holds a random token (Flask-Login's
"alternative token": ``User.get_id()`` returns it) and the ``login_sessions`` table holds its
SHA-256. Each browser request looks the token up in one query joined to its user; deleting
the row (logout, "log out everywhere", ending one session from the settings page) ends the
login wherever the cookie was copied, and ends the streams it opened within seconds
(chatapp.chat.stream). A login session lasts at most ``PERMANENT_SESSION_LIFETIME`` (Flask's
setting, 31 days) from login, as long as the cookie's signature is accepted.

Services add and flush; the caller commits.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

import sqlalchemy as sa
from flask import Response, current_app, g, request

from chatapp.auth.models import LoginSession, User
from chatapp.db import begin_write, db, utcnow

log = logging.getLogger(__name__)

# last_seen_at is a hint for people: written at most this often, in its own short write
# after the request's work (record_use), so that reading pages stays reading.
TOUCH_INTERVAL = timedelta(minutes=5)
USER_AGENT_MAX = 200
# Longer than any token start() makes (43 characters); anything longer is not worth hashing.
TOKEN_MAX = 100


@dataclass(frozen=True)
class LoginSessionRef:
    """The request's login session as plain data (no ORM object)."""

    id: int
    last_seen_at: datetime


def hash_login_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _oldest_valid_start() -> datetime:
    return utcnow() - current_app.permanent_session_lifetime


def _user_agent_summary() -> str:
    """The browser's User-Agent, printable characters only, cut to what the column holds."""
    agent = request.user_agent.string or ""
    return "".join(ch for ch in agent if ch.isprintable())[:USER_AGENT_MAX]


def start(user: User) -> int:
    """Add a login session for ``user`` and give ``user`` its token (for Flask-Login's login_user).

    Call it in the login's write transaction, after the password was checked; returns the
    session's id. The user's expired sessions are deleted on the way, so rows do not pile up.
    """
    token = secrets.token_urlsafe(32)
    db.session.execute(
        sa.delete(LoginSession).where(LoginSession.user_id == user.id, LoginSession.created_at < _oldest_valid_start())
    )
    row = LoginSession(
        user_id=user.id,
        token_hash=hash_login_token(token),
        user_agent=_user_agent_summary(),
        ip_address=(request.remote_addr or "")[:45],
    )
    db.session.add(row)
    db.session.flush()
    user.login_token = token
    return row.id


# The query every browser request runs (Flask-Login's user_loader), built once: the user
# and the plain columns of its unexpired login session, in one statement.
_sessions = LoginSession.__table__
_SESSION_USER = (
    sa.select(User, _sessions.c.id, _sessions.c.last_seen_at)
    .join(_sessions, _sessions.c.user_id == User.id)
    .where(
        _sessions.c.token_hash == sa.bindparam("token_hash"),
        _sessions.c.created_at > sa.bindparam("oldest", type_=LoginSession.created_at.type),
    )
)


def load_user(token: str) -> User | None:
    """The user whose unexpired login session the cookie's token names, or None.

    Sets ``g.login_session`` to that session's plain columns (id, last_seen_at): what
    logout, the settings page, streams and record_use need, without another query.
    """
    if not isinstance(token, str) or not token or len(token) > TOKEN_MAX:
        return None
    found = db.session.execute(
        _SESSION_USER, {"token_hash": hash_login_token(token), "oldest": _oldest_valid_start()}
    ).first()
    if found is None:
        return None
    user, session_id, last_seen_at = found
    user.login_token = token
    g.login_session = LoginSessionRef(session_id, last_seen_at)
    return user


def current_session_id() -> int:
    """The id of the login session the current request's cookie names (once the user is loaded)."""
    ref = g.get("login_session")
    if ref is None:
        raise RuntimeError("no login session is loaded for this request")
    return ref.id


def needs_touch(last_seen_at: datetime | None) -> bool:
    return last_seen_at is None or utcnow() - last_seen_at > TOUCH_INTERVAL


def touch(session_id: int) -> None:
    """Record that a login session was used (at most once per TOUCH_INTERVAL)."""
    now = utcnow()
    db.session.execute(
        sa.update(LoginSession)
        .where(LoginSession.id == session_id, LoginSession.last_seen_at < now - TOUCH_INTERVAL)
        .values(last_seen_at=now)
    )


def record_use(response: Response) -> Response:
    """Stamp the login session's last_seen_at in its own short write, after the view's work is done."""
    ref = g.get("login_session")
    if ref is None or response.status_code >= 400 or not needs_touch(ref.last_seen_at):
        return response
    try:
        db.session.rollback()  # the view's transaction has ended (chatapp.db.policy); this is a write of its own
        begin_write()
        touch(ref.id)
        db.session.commit()
    except Exception:  # a hint for people, never worth failing the request over
        db.session.rollback()
        log.warning("could not record use of login session %s", ref.id, exc_info=True)
    return response


def end(user_id: int, session_id: int) -> bool:
    """End one of the user's login sessions; False if it is not theirs or already ended."""
    result = db.session.execute(
        sa.delete(LoginSession).where(LoginSession.id == session_id, LoginSession.user_id == user_id)
    )
    return cast(sa.CursorResult, result).rowcount > 0


def end_other_sessions(user_id: int, keep: int | None = None) -> int:
    """End every login session of the user except ``keep``; returns how many ended.

    ``keep=None`` ends them all: "Log out everywhere". A password change must call this
    with ``keep`` set to the id of the session that changed the password
    (``current_session_id()``), so that every other browser, possibly the one that stole
    the old password, is logged out while the person changing it stays logged in. It does
    not touch API tokens, which are revoked one by one.
    """
    query = sa.delete(LoginSession).where(LoginSession.user_id == user_id)
    if keep is not None:
        query = query.where(LoginSession.id != keep)
    return cast(sa.CursorResult, db.session.execute(query)).rowcount


def list_sessions(user_id: int) -> Sequence[sa.Row]:
    """The user's unexpired login sessions, most recently seen first, as plain rows."""
    return db.session.execute(
        sa.select(
            _sessions.c.id,
            _sessions.c.created_at,
            _sessions.c.last_seen_at,
            _sessions.c.user_agent,
            _sessions.c.ip_address,
        )
        .where(_sessions.c.user_id == user_id, _sessions.c.created_at > _oldest_valid_start())
        .order_by(_sessions.c.last_seen_at.desc(), _sessions.c.id.desc())
    ).all()


_ACTIVE_SESSION = sa.select(_sessions.c.id).where(
    _sessions.c.id == sa.bindparam("session_id"),
    _sessions.c.created_at > sa.bindparam("oldest", type_=LoginSession.created_at.type),
)


def is_active(session_id: int) -> bool:
    """Whether a login session still exists and has not expired (one small query)."""
    return (
        db.session.execute(_ACTIVE_SESSION, {"session_id": session_id, "oldest": _oldest_valid_start()}).first()
        is not None
    )
