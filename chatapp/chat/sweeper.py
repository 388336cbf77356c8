"""Find replies that no live process is generating, and run them again.

A reply whose lease expired (its process was killed, ran out of memory, lost its host or
lost the database for too long), or that no runner claimed after it was committed, is
submitted to this process's runner, which claims it as a new attempt; a reply out of
runs is failed, saying why. Every process sweeps, at start-up and then every
REPLY_SWEEP_INTERVAL seconds; the claim is one guarded UPDATE, so two sweepers finding
the same orphan start it once.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from flask import Flask

from chatapp.chat import leases
from chatapp.chat.runner import get_runner
from chatapp.db import is_transient, unit_of_work
from chatapp.ops.metrics import job

log = logging.getLogger(__name__)
EXTENSION_KEY = "chatapp.sweeper"


@job("sweeper")
def sweep_once(app: Flask) -> list[int]:
    """Hand every orphaned reply to this process's runner; returns the ids it took."""
    config = app.config
    runner = get_runner(app)
    with unit_of_work(app, write=False):
        # A plain read in the common case (nothing orphaned): no write lock taken. Replies
        # queued or running here are this runner's already.
        found = leases.orphans(float(config["REPLY_LEASE_SECONDS"]), exclude=runner.busy_with())
    if not found:
        return []
    with unit_of_work(app):
        failed = leases.fail_exhausted(int(config["REPLY_MAX_RUNS"]))
    if failed:
        log.warning(
            "failed %d repl%s interrupted %d times", failed, "y" if failed == 1 else "ies", config["REPLY_MAX_RUNS"]
        )
    # The claim decides: of several processes taking the same orphan, one runs it.
    taken = runner.adopt(found)
    if taken:
        log.warning("taking over %d orphaned repl%s: %s", len(taken), "y" if len(taken) == 1 else "ies", taken)
    return taken


class Sweeper:
    """One daemon thread per process; started by the first request or by the server's
    worker hook (gunicorn.conf.py), never by the factory."""

    def __init__(self, app: Flask):
        self.app = app
        self._pid: int | None = None
        self._lock = threading.Lock()
        # Queue mode: only Celery workers sweep (chatapp.jobs sets this); a web process
        # runs no replies of its own.
        self.queue_worker = False

    def ensure_started(self) -> None:
        interval = self.app.config["REPLY_SWEEP_INTERVAL"]
        if not interval or self._pid == os.getpid():
            return
        if self.app.config.get("REPLY_QUEUE") and not self.queue_worker:
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            threading.Thread(target=self._loop, args=(float(interval),), name="reply-sweeper", daemon=True).start()

    def _loop(self, interval: float) -> None:
        while True:
            try:
                sweep_once(self.app)
            except Exception as exc:  # a database outage must not end the loop
                # An outage is expected and says enough in one line; anything else is a bug.
                log.warning(
                    "reply sweep failed (%s); retrying in %g s",
                    getattr(exc, "orig", None) or exc,
                    interval,
                    exc_info=not is_transient(exc),
                )
            time.sleep(interval)  # holds nothing: each pass is its own unit of work


def init_app(app: Flask) -> None:
    sweeper = Sweeper(app)
    app.extensions[EXTENSION_KEY] = sweeper
    app.before_request(sweeper.ensure_started)


def get_sweeper(app: Flask) -> Sweeper:
    return app.extensions[EXTENSION_KEY]
