"""Fail replies orphaned by a crashed process, at start-up and then periodically."""

from __future__ import annotations

import logging
import os
import threading
import time

from flask import Flask

from chatapp.chat import services
from chatapp.db import is_transient, unit_of_work
from chatapp.ops.metrics import job

log = logging.getLogger(__name__)
EXTENSION_KEY = "chatapp.reaper"


@job("reaper")
def reap_once(app: Flask) -> int:
    with unit_of_work(app):
        count = services.reap_stale_replies(app.config["REPLY_STALE_AFTER"])
    if count:
        log.warning("marked %d interrupted repl%s as failed", count, "y" if count == 1 else "ies")
    return count


class Reaper:
    """One daemon thread per process; started by the first request, so never in the factory."""

    def __init__(self, app: Flask):
        self.app = app
        self._pid: int | None = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        interval = self.app.config["REPLY_REAP_INTERVAL"]
        if not interval or self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            threading.Thread(
                target=self._loop, args=(float(interval),), name="reply-reaper", daemon=True
            ).start()

    def _loop(self, interval: float) -> None:
        while True:
            try:
                reap_once(self.app)
            except Exception as exc:  # a database outage must not end the loop
                # An outage is expected and says enough in one line; anything else is a bug.
                log.warning("reaper pass failed (%s); retrying in %g s",
                            getattr(exc, "orig", None) or exc, interval,
                            exc_info=not is_transient(exc))
            time.sleep(interval)  # holds nothing: each pass is its own unit of work


def init_app(app: Flask) -> None:
    reaper = Reaper(app)
    app.extensions[EXTENSION_KEY] = reaper
    app.before_request(reaper.ensure_started)
