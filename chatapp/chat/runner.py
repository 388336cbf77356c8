"""Where replies run: an in-process thread pool by default, behind a small interface.

A runner receives reply ids only. A job queue (RQ, Celery, Dramatiq) can replace the
pool by implementing ``submit`` to enqueue the id and calling ``generate_reply`` in its
worker, which pushes its own app context.

Before a view commits a pending reply it reserves the reply's place with ``reserve``
(which refuses when the runner is full), so that a reply is never committed that no
runner will take; a job queue's ``reserve`` may always succeed.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import sqlalchemy as sa
from flask import Flask

from chatapp.chat import live_replies, services
from chatapp.chat.live_replies import LiveReply
from chatapp.chat.pipeline import generate_reply
from chatapp.db import db, is_transient, remove_session
from chatapp.errors import ServiceBusy

log = logging.getLogger(__name__)
EXTENSION_KEY = "chatapp.reply_runner"


class ReplyRunner(Protocol):
    def reserve(self) -> Reservation: ...

    def submit(self, reply_id: int, reservation: Reservation | None = None) -> None: ...

    def wait_idle(self, timeout: float | None = None) -> bool: ...


class Reservation:
    """A place for one reply in a runner, held from before the view's commit until ``submit``.

    A context manager: leaving the block gives the place back unless ``submit`` used it
    (the commit failed, or the view raised). ``release`` may be called more than once.
    """

    def __init__(self, release=None):
        self._give_back = release
        self.held = release is not None

    def release(self) -> None:
        if self._give_back is not None:
            self._give_back(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class ThreadPoolReplyRunner:
    """Runs replies on daemon threads of this process; created lazily, so it survives fork.

    At most ``max_workers`` replies run and ``queue_max`` more wait; ``reserve`` refuses
    beyond that, so a flood of posts cannot queue unbounded work in one process.
    """

    def __init__(self, app: Flask, max_workers: int, queue_max: int):
        self.app = app
        self.max_workers = max_workers
        self.queue_max = queue_max
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0  # submitted and not finished: running or waiting for a thread
        self._reserved = 0  # places reserved by views that have not submitted yet
        self._executor: ThreadPoolExecutor | None = None
        self._pid: int | None = None

    def _pool(self) -> ThreadPoolExecutor:
        # A pool created before a fork (gunicorn --preload) has no threads in the child.
        if self._executor is None or self._pid != os.getpid():
            self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="reply")
            self._pid = os.getpid()
            self._in_flight = 0
            self._reserved = 0
        return self._executor

    def reserve(self) -> Reservation:
        """A place for one more reply, or ServiceBusy (503) if as many as can wait already do."""
        with self._lock:
            self._pool()
            if self._in_flight + self._reserved >= self.max_workers + self.queue_max:
                raise ServiceBusy(
                    "too many replies are waiting for the bot; nothing was saved, retry in a moment",
                    code="replies_busy",
                )
            self._reserved += 1
        return Reservation(self._release)

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation.held:
                reservation.held = False
                self._reserved -= 1

    def submit(self, reply_id: int, reservation: Reservation | None = None) -> None:
        reply_id = int(reply_id)
        with self._lock:
            pool = self._pool()
            if reservation is not None and reservation.held:
                # The reserved place becomes the reply's, in one step: no other view can
                # take it in between.
                reservation.held = False
                self._reserved -= 1
            self._in_flight += 1
        # Registered before the job starts, so a stream opened right after the 202
        # already waits on this process's notifications instead of polling.
        live = self.live.start(reply_id)
        try:
            pool.submit(self._run, reply_id, live)
        except BaseException:  # shutting down: the reaper fails the reply later
            self._done(reply_id, live)
            raise

    @property
    def live(self) -> live_replies.LiveReplies:
        return live_replies.get_live_replies(self.app)

    def _run(self, reply_id: int, live: LiveReply) -> None:
        try:
            generate_reply(self.app, reply_id, live)
        except Exception:  # the reaper fails the reply later; never kill the pool thread
            log.exception("reply runner crashed on reply %s", reply_id)
        finally:
            self._done(reply_id, live)

    def _done(self, reply_id: int, live: LiveReply) -> None:
        self.live.finish(reply_id, live)
        with self._lock:
            self._in_flight -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)


def init_app(app: Flask) -> None:
    live_replies.init_app(app)
    app.extensions[EXTENSION_KEY] = ThreadPoolReplyRunner(
        app, app.config["REPLY_WORKERS"], app.config["REPLY_QUEUE_MAX"]
    )


def get_runner(app: Flask) -> ReplyRunner:
    return app.extensions[EXTENSION_KEY]


def commit_and_start_reply(app: Flask, reply_id: int, attempt: int) -> None:
    """Commit the view's unit of work, which made this reply attempt pending, then start it.

    A commit whose connection died after COMMIT was sent may have landed anyway. A
    landed reply that no runner starts would stay pending until the reaper gives up on
    it (``REPLY_STALE_AFTER``), and its conversation would refuse new messages until
    then. So after a failed commit, look in a new short transaction: if the reply is
    stored at this attempt, start it; if not, or if the database is still down, raise.

    The reply's place in the runner is reserved first: a full runner answers 503 before
    anything is committed, and a committed reply always has its place.
    """
    with get_runner(app).reserve() as reservation:
        _commit_and_submit(app, reply_id, attempt, reservation)


def _commit_and_submit(app: Flask, reply_id: int, attempt: int, reservation: Reservation) -> None:
    try:
        db.session.commit()
    except sa.exc.DBAPIError as error:
        if not is_transient(error):
            raise
        remove_session()  # the failed session, and its dead connection
        progress = services.read_reply_progress(reply_id, 0)
        db.session.commit()
        if progress is None or progress["attempt"] != attempt:
            raise
        log.warning("a commit for reply %s failed in flight but landed; starting the reply", reply_id)
    # Only the id crosses into the runner's thread, after the commit made it visible.
    get_runner(app).submit(reply_id, reservation)
