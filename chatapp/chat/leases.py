"""Reply leases: which process generates a reply, and until when.

A process claims a reply with a lease (its owner name and an expiry) in one UPDATE, so of
two processes racing for a reply exactly one wins. The owner renews the lease while it
runs, also while the bot is silent; every write of the reply is guarded by the lease, so
a process that lost it (it was too slow to renew, or the reply was stopped, deleted or
regenerated) can no longer touch the reply. A lease that expires means its process died
or lost the database: any live process claims the reply again and runs it as a new
attempt, up to REPLY_MAX_RUNS runs. Each function here is one statement, run in the
caller's short unit of work; none holds anything between calls.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import datetime, timedelta
from typing import cast

import sqlalchemy as sa

from chatapp.chat.models import ACTIVE_SQL, ACTIVE_STATUSES, Conversation, Message, Status
from chatapp.db import db, utcnow

# Set on a reply whose owner handed it over (a worker shutting down): not the name of any
# process, so the old owner's writers match nothing, and the next claim starts a new attempt.
RELEASED = "released"
_messages = cast(sa.Table, Message.__table__)
_conversations = cast(sa.Table, Conversation.__table__)
_active = _messages.c.status.in_(ACTIVE_STATUSES)


_owner: tuple[int, str] | None = None


def process_owner() -> str:
    """This process's name on the leases it takes: host, pid and a nonce (pids are reused).

    Made afresh in a forked child, so two gunicorn workers never share one.
    """
    global _owner
    if _owner is None or _owner[0] != os.getpid():
        _owner = (os.getpid(), f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}")
    return _owner[1]


def interrupted_error(runs: int) -> str:
    return (
        f"the reply was interrupted {runs} times (the process generating it stopped or lost "
        "the database); regenerate to retry"
    )


def _expiry(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


def claim(
    reply_id: int, owner: str, lease_seconds: float, max_runs: int, default_model: str | None = None
) -> int | None:
    """Take the lease of an unclaimed or orphaned reply; returns its attempt, or None.

    A reply that had an owner before (it died, or handed the reply over) starts a new
    attempt from empty text, so streams reset and the old owner's writes match no row.
    With ``default_model``, the same UPDATE records the model this run uses: its
    conversation's, else that default.
    """
    row = _claim(reply_id, owner, lease_seconds, max_runs, default_model)
    return None if row is None else row.attempt


def _conversation_column(name: str):
    """The reply's conversation's column ``name``, looked up by its primary key."""
    column = _conversations.c[name]
    return sa.select(column).where(_conversations.c.id == _messages.c.conversation_id).scalar_subquery().label(name)


def claim_run(reply_id: int, owner: str, lease_seconds: float, max_runs: int, default_model: str) -> sa.Row | None:
    """``claim``, also returning what the run needs of the reply's conversation, in the same
    statement: (attempt, conversation_id, model, system_prompt, title_source); None if not
    claimed. ``model`` is the one the claim recorded (the conversation's, else the default)."""
    return _claim(
        reply_id,
        owner,
        lease_seconds,
        max_runs,
        default_model,
        _messages.c.conversation_id,
        _messages.c.model,
        _conversation_column("system_prompt"),
        _conversation_column("title_source"),
    )


def _claim(
    reply_id: int, owner: str, lease_seconds: float, max_runs: int, default_model: str | None, *returning
) -> sa.Row | None:
    now = utcnow()
    had_owner = _messages.c.lease_owner.is_not(None)
    extra = {}
    if default_model is not None:
        extra["model"] = sa.func.coalesce(
            sa.select(_conversations.c.model)
            .where(_conversations.c.id == _messages.c.conversation_id)
            .scalar_subquery(),
            default_model,
        )
    result = db.session.execute(
        sa.update(_messages)
        .where(
            _messages.c.id == reply_id,
            _active,
            sa.or_(_messages.c.lease_owner.is_(None), _messages.c.lease_expires_at < now),
            _messages.c.runs < max_runs,
        )
        .values(
            lease_owner=owner,
            lease_expires_at=_expiry(now, lease_seconds),
            runs=_messages.c.runs + 1,
            attempt=sa.case((had_owner, _messages.c.attempt + 1), else_=_messages.c.attempt),
            content=sa.case((had_owner, ""), else_=_messages.c.content),
            status=Status.PENDING,
            error=None,
            updated_at=now,
            **extra,
        )
        .returning(_messages.c.attempt, *returning)
    )
    return result.first()


def renew(owner: str, reply_ids: list[int], lease_seconds: float) -> set[int]:
    """Extend this owner's leases; returns the ids it still holds (the rest were lost)."""
    if not reply_ids:
        return set()
    now = utcnow()
    result = db.session.execute(
        sa.update(_messages)
        .where(_messages.c.id.in_(reply_ids), _messages.c.lease_owner == owner, _active)
        .values(lease_expires_at=_expiry(now, lease_seconds))
        .returning(_messages.c.id)
    )
    return set(result.scalars())


def still_held(owner: str, reply_ids: list[int]) -> set[int]:
    """Of these replies, the ones this owner still generates (not stopped, deleted, lost)."""
    if not reply_ids:
        return set()
    return set(
        db.session.scalars(
            sa.select(_messages.c.id).where(_messages.c.id.in_(reply_ids), _messages.c.lease_owner == owner, _active)
        )
    )


def release(owner: str, reply_ids: list[int]) -> int:
    """Hand replies over: their leases expire now, and the run does not count against them."""
    if not reply_ids:
        return 0
    result = db.session.execute(
        sa.update(_messages)
        .where(_messages.c.id.in_(reply_ids), _messages.c.lease_owner == owner, _active)
        .values(
            lease_owner=RELEASED,
            lease_expires_at=utcnow() - timedelta(seconds=1),
            runs=sa.case((_messages.c.runs > 0, _messages.c.runs - 1), else_=0),
        )
    )
    return cast(sa.CursorResult, result).rowcount


def orphans(unclaimed_after: float, exclude: set[int] | frozenset[int] = frozenset(), limit: int = 50) -> list[int]:
    """Replies in progress that no live process holds: expired leases, and pending replies
    no runner claimed within ``unclaimed_after`` seconds (their process died between the
    commit and the start, or the start was lost). ``exclude``: ids this process already has.

    The status test is the partial indexes' own predicate, as literal SQL, so the read
    scans the few replies in progress, not the messages table.
    """
    now = utcnow()
    query = sa.select(_messages.c.id).where(
        ACTIVE_SQL,
        sa.or_(
            _messages.c.lease_expires_at < now,
            sa.and_(
                _messages.c.lease_owner.is_(None),
                _messages.c.updated_at < now - timedelta(seconds=unclaimed_after),
            ),
        ),
    )
    if exclude:
        query = query.where(_messages.c.id.not_in(sorted(exclude)))
    return sorted(db.session.scalars(query.limit(limit)))


def fail_exhausted(max_runs: int) -> int:
    """End replies whose lease expired after their last allowed run, saying why."""
    now = utcnow()
    result = db.session.execute(
        sa.update(_messages)
        .where(ACTIVE_SQL, _messages.c.lease_expires_at < now, _messages.c.runs >= max_runs)
        .values(
            status=Status.FAILED,
            error=interrupted_error(max_runs),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
    )
    return cast(sa.CursorResult, result).rowcount
