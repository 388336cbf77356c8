"""Account and token rules. Services add and flush; the caller commits."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, TypeGuard, cast

import sqlalchemy as sa
from flask import current_app
from werkzeug.security import check_password_hash, generate_password_hash

from chatapp import inputs
from chatapp.auth import login_sessions
from chatapp.auth.models import ApiToken, LoginSession, User
from chatapp.db import db, utcnow
from chatapp.errors import Conflict, InvalidInput, ServiceBusy
from chatapp.green import off_hub

TOKEN_PREFIX = "chat_"
# last_used_at is a hint for people, not an audit log: writing it at most this often
# keeps read requests from becoming write transactions.
TOKEN_TOUCH_INTERVAL = timedelta(seconds=60)
# Verifying against this hash when the user does not exist keeps the response time
# of a wrong username close to that of a wrong password.
_DUMMY_HASH: dict[str, str] = {}
# app.extensions key of the semaphore that bounds concurrent password hashes.
_HASH_SLOTS = "chatapp.password_hash_slots"
# A login that waits longer than this for a hashing slot answers 503 rather than
# keeping its worker thread queued behind a burst.
HASH_WAIT_SECONDS = 20.0


def validate_username(username: object) -> str:
    problem = inputs.username_problem(username)
    if problem or not isinstance(username, str):  # a problem names every value that is not text
        raise InvalidInput(f"username {problem}", field="username")
    return username


def validate_password(password: object) -> str:
    problem = inputs.password_problem(password)
    if problem or not isinstance(password, str):  # a problem names every value that is not text
        raise InvalidInput(f"password {problem}", field="password")
    return password


@contextlib.contextmanager
def _hashing_slot() -> Iterator[None]:
    """Hold one of this process's PASSWORD_HASH_CONCURRENCY slots while hashing.

    scrypt at n=2**17, r=8 takes 128 MiB per hash: a burst of logins must queue, not
    exhaust memory. Callers wait here holding no database connection (they end their
    transaction before hashing, see find_login), so the queue costs no pool slots.
    """
    slots = current_app.extensions.get(_HASH_SLOTS)
    if slots is None:
        # setdefault is atomic: threads racing here all get the same semaphore.
        slots = current_app.extensions.setdefault(
            _HASH_SLOTS, threading.BoundedSemaphore(int(current_app.config["PASSWORD_HASH_CONCURRENCY"]))
        )
    if not slots.acquire(timeout=HASH_WAIT_SECONDS):
        raise ServiceBusy("the server is busy checking passwords; retry in a moment", code="busy")
    try:
        yield
    finally:
        slots.release()


def hash_password(password: str) -> str:
    with _hashing_slot():
        return off_hub(generate_password_hash, password, method=current_app.config["PASSWORD_HASH_METHOD"])


def _dummy_hash() -> str:
    """A hash of a random password made with the configured method (made once per method)."""
    method = current_app.config["PASSWORD_HASH_METHOD"]
    if method not in _DUMMY_HASH:
        with _hashing_slot():
            _DUMMY_HASH[method] = off_hub(generate_password_hash, secrets.token_hex(8), method=method)
    return _DUMMY_HASH[method]


def _method_of(password_hash: str) -> str:
    """The method with its parameters a Werkzeug hash was made with, e.g. "scrypt:131072:8:1"."""
    return password_hash.split("$", 1)[0]


def find_user(username: str) -> User | None:
    """The user with this name in any case: names are stored as typed, compared lowercased
    (the unique index on lower(username) makes "Alice" and "alice" one name)."""
    return db.session.scalar(sa.select(User).where(sa.func.lower(User.username) == username.lower()))


def username_taken(username: str) -> bool:
    return db.session.scalar(sa.select(User.id).where(sa.func.lower(User.username) == username.lower())) is not None


def taken_message(username: str) -> str:
    return f"username {username!r} is taken; choose another"


def registration_problems(username: object, password: object) -> tuple[dict[str, list[str]], bool]:
    """Every problem with a registration at once, by field, each worded without the field's
    name ("must be 8-200 characters"), and whether the name is taken (in any case), which
    is read only when the name is otherwise valid; the caller ends that read before hashing."""
    problems: dict[str, list[str]] = {}
    taken = False
    username_problem = inputs.username_problem(username)
    if username_problem:
        problems["username"] = [username_problem]
    elif isinstance(username, str) and username_taken(username):
        taken = True
        problems["username"] = [f"{username!r} is taken; choose another"]
    password_problem = inputs.password_problem(password)
    if password_problem:
        problems["password"] = [password_problem]
    return problems, taken


def new_user(username: object, password: object) -> User:
    """A valid, not yet added user with its password hashed.

    Touches no database: hashing is deliberately slow (scrypt), so do it before the
    unit of work that adds the user, never while holding a connection.
    """
    username = validate_username(username)
    password = validate_password(password)
    return User(username=username, password_hash=hash_password(password))


def add_user(user: User) -> User:
    """Add a user from new_user(); raises Conflict if the name is taken."""
    if find_user(user.username) is not None:
        raise Conflict(taken_message(user.username), code="username_taken")
    db.session.add(user)
    try:
        # A concurrent registration of the same name loses here, not at commit.
        with db.session.begin_nested():
            db.session.flush()
    except sa.exc.IntegrityError:
        raise Conflict(taken_message(user.username), code="username_taken") from None
    return user


def create_user(username: object, password: object) -> User:
    """new_user() then add_user(): for scripts and tests that hold no other connection."""
    return add_user(new_user(username, password))


def find_login(username: object) -> User | None:
    """The user a login names, read so that the caller can end its transaction before
    checking the password (see password_matches)."""
    return find_user(username) if isinstance(username, str) else None


def password_matches(user: User | None, password: object) -> TypeGuard[User]:
    """Check a password against find_login()'s user; touches no database, and is slow on
    purpose (scrypt: a fraction of a second, after waiting for a hashing slot).

    When there is no such user a dummy hash is checked, so that a wrong username takes
    as long as a wrong password and names cannot be probed by timing.
    """
    if user is None:
        dummy = _dummy_hash()
        with _hashing_slot():
            off_hub(check_password_hash, dummy, str(password))
        return False
    if not isinstance(password, str):
        return False
    dummy = _dummy_hash()  # made (once) before taking a slot: making it takes one too
    with _hashing_slot():
        if off_hub(check_password_hash, user.password_hash, password):
            return True
        if _method_of(user.password_hash) != _method_of(dummy):
            # A hash from an older, cheaper method fails faster than the dummy check of a
            # name that does not exist: pay the configured cost, so timing tells nothing.
            off_hub(check_password_hash, dummy, password)
        return False


def upgraded_password_hash(user: User, password: str) -> str | None:
    """After a login that password_matches() accepted: a new hash of the password if the
    stored one was made with another method than PASSWORD_HASH_METHOD (an older default,
    weaker parameters), else None. Touches no database (hashing; call it outside any
    transaction), then store the hash with replace_password_hash() in the login's write.

    The configured method's full form ("scrypt" means "scrypt:32768:8:1") is read from
    the dummy hash Werkzeug made with it, not guessed here.
    """
    if _method_of(user.password_hash) == _method_of(_dummy_hash()):
        return None
    return hash_password(password)


def replace_password_hash(user_id: int, old_hash: str, new_hash: str) -> bool:
    """Store a new hash of the password, unless the password changed since ``old_hash`` was
    read; False then, changing nothing."""
    result = db.session.execute(
        sa.update(User).where(User.id == user_id, User.password_hash == old_hash).values(password_hash=new_hash)
    )
    return cast(sa.CursorResult, result).rowcount > 0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(user_id: int, name: str = "") -> tuple[ApiToken, str]:
    """Add a new token for the user; returns the row and the token, which is never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        user_id=user_id,
        token_hash=hash_token(token),
        prefix=token[:12],
        name=name[: inputs.limit("TOKEN_NAME_MAX_LENGTH")],
    )
    db.session.add(row)
    db.session.flush()
    return row, token


# The one query every Bearer request runs, built once: constructing a select costs more
# CPU than executing a cached one. Plain columns of the tables, not ORM entities, so
# no ApiToken or User object is built (the ORM load was the dearest part of a request).
# The join refuses a token whose user is gone (possible on SQLite with foreign keys off).
_tokens, _users = ApiToken.__table__, User.__table__
_ACTIVE_TOKEN = (
    sa.select(_tokens.c.id, _tokens.c.user_id, _tokens.c.last_used_at)
    .join(_users, _users.c.id == _tokens.c.user_id)
    .where(_tokens.c.token_hash == sa.bindparam("token_hash"), _tokens.c.revoked_at.is_(None))
)


def find_active_token(token: str) -> sa.Row | None:
    """The unrevoked token a request presents, as a plain row: id, user_id, last_used_at."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    # Core on the session's connection (its transaction, begun here if not yet): the
    # session's execute() adds ORM dispatch this plain-column statement never uses.
    return db.session.connection().execute(_ACTIVE_TOKEN, {"token_hash": hash_token(token)}).first()


def token_needs_touch(token: ApiToken | sa.Row) -> bool:
    """Whether last_used_at is old enough to write again (token: a row or an ApiToken)."""
    return token.last_used_at is None or utcnow() - token.last_used_at > TOKEN_TOUCH_INTERVAL


def touch_token(token_id: int) -> None:
    """Record that a token was used (at most once per TOKEN_TOUCH_INTERVAL)."""
    now = utcnow()
    db.session.execute(
        sa.update(ApiToken)
        .where(
            ApiToken.id == token_id,
            sa.or_(
                ApiToken.last_used_at.is_(None),
                ApiToken.last_used_at < now - TOKEN_TOUCH_INTERVAL,
            ),
        )
        .values(last_used_at=now)
    )


def revoke_token(token: ApiToken | sa.Row) -> None:
    """Revoke a token: an ApiToken, or the row find_active_token() returned (only its id is read).

    An ORM-enabled UPDATE, so that an ApiToken loaded in this session sees its new
    revoked_at; a token revoked before keeps the time it was first revoked.
    """
    db.session.execute(
        sa.update(ApiToken).where(ApiToken.id == token.id, ApiToken.revoked_at.is_(None)).values(revoked_at=utcnow())
    )


@dataclass(frozen=True)
class Credential:
    """What a request authenticated with, as plain data: a stream re-checks it while it runs."""

    kind: Literal["token", "login_session"]
    id: int


_UNREVOKED_TOKEN = sa.select(_tokens.c.id).where(
    _tokens.c.id == sa.bindparam("token_id"), _tokens.c.revoked_at.is_(None)
)


def credential_is_active(credential: Credential) -> bool:
    """Whether the token is unrevoked, or the login session not ended (one small query)."""
    if credential.kind == "token":
        return db.session.execute(_UNREVOKED_TOKEN, {"token_id": credential.id}).first() is not None
    return login_sessions.is_active(credential.id)


def list_tokens(user_id: int) -> list[ApiToken]:
    return list(
        db.session.scalars(
            sa.select(ApiToken)
            .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
            .order_by(ApiToken.id.desc())
        )
    )


def find_user_token(user_id: int, token_id: int) -> ApiToken | None:
    return db.session.scalar(sa.select(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user_id))


def set_password(
    user_id: int, old_hash: str, new_hash: str, *, keep_session: int | None, revoke_tokens: bool
) -> int | None:
    """Store a changed password (hashed beforehand, outside any transaction); end the account's
    other browser logins, all but ``keep_session``, and with ``revoke_tokens`` its API tokens.
    Returns how many browser logins ended.

    None, changing nothing, if the password changed since ``old_hash`` was read (another
    change won the race: the current password checked is no longer current).
    """
    if not replace_password_hash(user_id, old_hash, new_hash):
        return None
    # Whoever knew the old password may be logged in elsewhere: those browsers are logged out.
    ended = login_sessions.end_other_sessions(user_id, keep=keep_session)
    if revoke_tokens:
        db.session.execute(
            sa.update(ApiToken)
            .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
    return ended


def delete_user(user_id: int) -> None:
    """Delete an account and everything it owns: conversations with their messages, API
    tokens, login sessions. Explicit deletes, child tables first, so that nothing is left
    where SQLite's foreign keys are off (SQLITE_FOREIGN_KEYS).

    A reply being generated for one of its conversations loses its row; its runner finds
    the reply gone at its next write and ends (chatapp.chat.reply_store), as when one
    conversation is deleted.
    """
    from chatapp.chat.models import Conversation, Message  # chat depends on auth, not the reverse

    owned = sa.select(Conversation.id).where(Conversation.owner_id == user_id).scalar_subquery()
    db.session.execute(sa.delete(Message).where(Message.conversation_id.in_(owned)))
    db.session.execute(sa.delete(Conversation).where(Conversation.owner_id == user_id))
    db.session.execute(sa.delete(ApiToken).where(ApiToken.user_id == user_id))
    db.session.execute(sa.delete(LoginSession).where(LoginSession.user_id == user_id))
    db.session.execute(sa.delete(User).where(User.id == user_id))
