"""Where replies run: daemon threads of this process by default, behind a small interface.

A runner receives reply ids only: ``submit(reply_id)`` asks for a reply to be generated
somewhere, ``cancel(reply_id)`` stops it here if it runs here, and ``shutdown(grace)``
hands everything over when the process exits. Whoever runs a reply first claims its
lease (chatapp.chat.leases) in the database, so a reply submitted twice, or re-claimed by
another process, still runs once at a time. A job queue can replace this pool by
enqueueing the id in ``submit`` and calling ``generate_reply`` in its worker.

Before a view's transaction begins, it reserves the reply's place with ``reserve``
(``reserves_a_reply``), which refuses when the runner is full, so that a reply is never
committed that no runner will take; a job queue's ``reserve`` checks only that its broker
answers, which is why it runs holding no database connection.

While this process runs replies, one keeper thread renews their leases every
REPLY_LEASE_RENEW_SECONDS and checks every REPLY_STOP_CHECK_SECONDS that it still holds
them: a reply stopped, deleted, regenerated or taken over elsewhere is cancelled here,
which closes the bot's request. Both are one statement for all of this process's replies.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

import sqlalchemy as sa
from flask import Flask, current_app

from chatapp.chat import leases, live_replies, reply_notices, services, titles
from chatapp.chat.live_replies import LiveReply
from chatapp.chat.pipeline import generate_reply
from chatapp.db import db, end_transaction, is_transient, remove_session, unit_of_work
from chatapp.errors import ServiceBusy
from chatapp.ops.metrics import LEASE_STATEMENTS, job

log = logging.getLogger(__name__)
EXTENSION_KEY = "chatapp.reply_runner"


class Cancellation:
    """A run's stop switch, shared by the pipeline and the bot (plain threading, no ORM)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.reason: str | None = None  # "stopped" (by its user or elsewhere), "handover"
        # Set once the run holds the reply's lease: only then can the keeper lose it.
        self.claimed = False

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True at once if cancelled."""
        return self._event.wait(timeout)

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when cancelled (now, if already): e.g. close a socket."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # closing an already closed socket, say: never fatal
                log.debug("cancel callback failed", exc_info=True)


class ReplyRunner(Protocol):
    def reserve(self) -> Reservation: ...

    def submit(self, reply_id: int, reservation: Reservation | None = None) -> None: ...

    def cancel(self, reply_id: int) -> None: ...

    def shutdown(self, grace: float) -> None: ...

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
    """Runs replies on daemon threads of this process; its state is made afresh after a fork.

    Daemon threads, not a ThreadPoolExecutor: an exiting interpreter joins an executor's
    threads, so a worker restarting (max_requests, HUP) would wait for its longest reply
    serving nothing. Here ``shutdown`` decides how long to wait, then hands over the rest.

    At most ``max_workers`` replies run and ``queue_max`` more wait; ``reserve`` refuses
    beyond that, so a flood of posts cannot queue unbounded work in one process.
    """

    def __init__(self, app: Flask, max_workers: int, queue_max: int):
        self.app = app
        self.max_workers = max_workers
        self.queue_max = queue_max
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pid: int | None = None

    def _fresh_state(self) -> None:
        # Called with the lock held, in a new process (or the first time).
        self._pid = os.getpid()
        self.owner = leases.process_owner()
        self._jobs: queue.SimpleQueue[tuple[int, LiveReply]] = queue.SimpleQueue()
        self._threads = 0
        self._idle_threads = 0
        # Runs in progress, by reply id: a list, as a regenerated reply's new run may start
        # while its old, cancelled run is still winding down.
        self._runs: dict[int, list[Cancellation]] = {}
        self._waiting: collections.Counter[int] = collections.Counter()  # queued, not started
        self._queued = 0  # submitted and not finished: running or waiting for a thread
        self._reserved = 0  # places reserved by views that have not submitted yet
        self._accepting = True
        self._keeper: threading.Thread | None = None

    def _state(self) -> None:
        if self._pid != os.getpid():
            self._fresh_state()

    @property
    def live(self) -> live_replies.LiveReplies:
        return live_replies.get_live_replies(self.app)

    def _full(self) -> bool:
        # With the lock held.
        return self._queued + self._reserved >= self.max_workers + self.queue_max

    def reserve(self) -> Reservation:
        """A place for one more reply, or ServiceBusy (503) if as many as can wait already do."""
        with self._lock:
            self._state()
            if self._full():
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
            self._state()
            if reservation is not None and reservation.held:
                # The reserved place becomes the reply's, in one step: no other view can
                # take it in between.
                reservation.held = False
                self._reserved -= 1
            if not self._accepting:
                # Shutting down: the reply stays unclaimed, and another process's sweep
                # claims it within REPLY_LEASE_SECONDS.
                log.info("not starting reply %s: this process is shutting down", reply_id)
                return
            self._enqueue(reply_id)

    def adopt(self, reply_ids: list[int]) -> list[int]:
        """Take orphaned replies a sweep found, skipping those already queued or running
        here and any beyond this runner's room; returns the ids taken."""
        taken = []
        with self._lock:
            self._state()
            for reply_id in reply_ids:
                if not self._accepting or self._full():
                    break
                if self._waiting[reply_id] or self._runs.get(reply_id):
                    continue
                self._enqueue(reply_id)
                taken.append(reply_id)
        return taken

    def busy_with(self) -> set[int]:
        """Reply ids queued or running here: a sweep leaves them to this runner."""
        with self._lock:
            self._state()
            return {reply_id for reply_id, n in self._waiting.items() if n} | set(self._runs)

    def _enqueue(self, reply_id: int) -> None:
        # With the lock held. Registered before the job starts, so a stream opened right
        # after the 202 already waits on this process's notifications instead of polling.
        live = self.live.start(reply_id)
        self._queued += 1
        self._waiting[reply_id] += 1
        # Put under the lock: an idle thread about to time out sees it and stays.
        self._jobs.put((reply_id, live))
        # A thread for every job beyond those already idle, up to max_workers.
        if self._jobs.qsize() > self._idle_threads and self._threads < self.max_workers:
            self._threads += 1
            threading.Thread(target=self._work, name="reply", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle_threads += 1
            try:
                reply_id, live = self._jobs.get(timeout=60)
            except queue.Empty:
                with self._lock:
                    self._idle_threads -= 1
                    if self._jobs.empty():
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle_threads -= 1
                self._waiting[reply_id] -= 1
                cancel: Cancellation | None = None
                if self._accepting:
                    cancel = Cancellation()
                    self._runs.setdefault(reply_id, []).append(cancel)
                    self._ensure_keeper()
                else:
                    cancel = None  # shutting down: left unclaimed, for another process
            try:
                if cancel is not None:
                    generate_reply(self.app, reply_id, owner=self.owner, cancel=cancel, live=live)
            except Exception:  # the lease expires and another run takes over; keep the thread
                log.exception("reply runner crashed on reply %s", reply_id)
            finally:
                self._done(reply_id, cancel, live)

    def _done(self, reply_id: int, cancel: Cancellation | None, live: LiveReply) -> None:
        self.live.finish(reply_id, live)
        with self._lock:
            runs = self._runs.get(reply_id, [])
            if cancel in runs:
                runs.remove(cancel)
            if not runs:
                self._runs.pop(reply_id, None)
            self._queued -= 1
            self._idle.notify_all()

    def running(self) -> list[int]:
        """Reply ids with a run in progress here."""
        with self._lock:
            self._state()
            return list(self._runs)

    def cancel(self, reply_id: int, reason: str = "stopped") -> None:
        with self._lock:
            self._state()
            runs = list(self._runs.get(int(reply_id), []))
        for run in runs:
            run.cancel(reason)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no reply runs or waits here, the keeper has stopped, and no title job is pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._replies_idle(timeout):
            return False
        # The title jobs the replies started are this runner's work too.
        return titles.get_title_jobs(self.app).wait_idle(
            None if deadline is None else max(0.0, deadline - time.monotonic())
        )

    def _replies_idle(self, timeout: float | None = None) -> bool:
        """Wait until no reply runs or waits here, and the keeper has stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._state()
            if not self._idle.wait_for(lambda: self._queued == 0, timeout):
                return False
            keeper = self._keeper
        if keeper is not None:
            keeper.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            return not keeper.is_alive()
        return True

    # --- the keeper: leases renewed, stops noticed --------------------------------------

    def _ensure_keeper(self) -> None:
        # With the lock held.
        if self._keeper is None or not self._keeper.is_alive():
            self._keeper = threading.Thread(target=self._keep, name="reply-keeper", daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        config = self.app.config
        check_every = float(config["REPLY_STOP_CHECK_SECONDS"])
        renew_every = float(config["REPLY_LEASE_RENEW_SECONDS"])
        renewed_at = time.monotonic()
        while True:
            with self._lock:
                # Woken early when the last run ends (_done), so the keeper is gone as
                # soon as the process is idle, never left mid-check behind its runs.
                self._idle.wait_for(lambda: not self._runs, check_every)
                if not self._runs:
                    self._keeper = None
                    return
                runs = [(reply_id, run) for reply_id, runs in self._runs.items() for run in runs if run.claimed]
            if not runs:
                continue
            renew = time.monotonic() - renewed_at >= renew_every
            try:
                held = self._check_leases(sorted({reply_id for reply_id, _run in runs}), renew)
            except Exception as exc:
                # The database is unreachable: keep the runs going (their writes retry);
                # if this lasts past the lease, another process takes the replies over
                # and these runs' writes match nothing.
                log.warning(
                    "could not check reply leases (%s)",
                    getattr(exc, "orig", None) or exc,
                    exc_info=not is_transient(exc),
                )
                continue
            if renew:
                renewed_at = time.monotonic()
            for reply_id, run in runs:
                if reply_id not in held:
                    run.cancel("stopped")

    @job("lease")
    def _check_leases(self, reply_ids: list[int], renew: bool) -> set[int]:
        lease_seconds = float(self.app.config["REPLY_LEASE_SECONDS"])
        LEASE_STATEMENTS.labels("renew" if renew else "check").inc()
        with unit_of_work(self.app, write=renew):
            if renew:
                return leases.renew(self.owner, reply_ids, lease_seconds)
            return leases.still_held(self.owner, reply_ids)

    # --- shutdown: finish what can finish, hand over the rest ----------------------------

    def shutdown(self, grace: float) -> None:
        """Stop taking replies; let running ones finish for ``grace`` seconds; hand over the rest."""
        with self._lock:
            self._state()
            self._accepting = False
        started = time.monotonic()
        try:
            # Replies only: a slow title must not keep them from being handed over.
            if self._replies_idle(max(0.0, grace)):
                return
            self._hand_over()
        finally:
            # Titles wait for the replies (which may submit one), within what is left of
            # the grace period; an unfinished title only leaves the default one.
            titles.get_title_jobs(self.app).shutdown(max(0.0, grace - (time.monotonic() - started)))

    def _hand_over(self) -> None:
        runs = self.running()
        log.warning("handing over %d unfinished repl%s to other processes", len(runs), "y" if len(runs) == 1 else "ies")
        for reply_id in runs:
            self.cancel(reply_id, "handover")
        # Cancelled runs close their bot requests and write nothing more; then the leases go.
        self._replies_idle(2.0)
        try:
            with job("lease"), unit_of_work(self.app):
                leases.release(self.owner, runs)
        except Exception:
            log.warning("could not release leases; they expire in REPLY_LEASE_SECONDS", exc_info=True)


def init_app(app: Flask) -> None:
    live_replies.init_app(app)
    reply_notices.init_app(app)
    if app.config.get("REPLY_QUEUE"):
        # Queue mode: this process enqueues reply and title jobs; Celery workers run them.
        from chatapp.chat.queue import QueueReplyRunner, QueueTitleJobs

        app.extensions[EXTENSION_KEY] = QueueReplyRunner(app)
        app.extensions[titles.EXTENSION_KEY] = QueueTitleJobs(app)
        return
    titles.init_app(app)
    app.extensions[EXTENSION_KEY] = ThreadPoolReplyRunner(
        app, app.config["REPLY_WORKERS"], app.config["REPLY_QUEUE_MAX"]
    )


def get_runner(app: Flask) -> ThreadPoolReplyRunner:
    return app.extensions[EXTENSION_KEY]


def reserves_a_reply(view: Callable) -> Callable:
    """Reserve the reply's place in the runner before the view's transaction; pass it as ``reservation``.

    Put it directly above ``@transaction(...)``. The authentication read (the token or the
    login's user) is ended first, so no connection is held while ``reserve`` checks the
    queue's Redis (up to REPLY_QUEUE_TIMEOUT when Redis does not answer). A refusal is a
    503 before anything is read or written; the place goes back however the view ends
    (a 4xx, an error, a form shown again) unless ``commit_and_start_reply`` used it.
    """

    @functools.wraps(view)
    def reserve_first(*args, **kwargs):
        end_transaction()
        with get_runner(current_app).reserve() as reservation:
            return view(*args, reservation=reservation, **kwargs)

    return reserve_first


def commit_and_start_reply(app: Flask, reply_id: int, attempt: int, reservation: Reservation) -> None:
    """Commit the view's unit of work, which made this reply attempt pending, then start it.

    ``reservation`` is the reply's place, reserved before the view's transaction began
    (``reserves_a_reply``): a full runner, or an unreachable queue, answered 503 before
    anything was written, and a committed reply always has its place.

    A commit whose connection died after COMMIT was sent may have landed anyway; a landed
    reply that nobody starts would wait for another process's sweep. So after a failed
    commit, look in a new short transaction: if the reply is stored at this attempt,
    start it; if not, or if the database is still down, raise.
    """
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
