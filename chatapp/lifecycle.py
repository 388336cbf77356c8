"""The serving process's life: whether it is shutting down, and what it does on exit.

gunicorn (gunicorn.conf.py) hands its worker over when the worker starts, and calls
``worker_exiting`` when it ends. A worker that stops accepting (TERM, HUP, max_requests)
sets ``worker.alive = False``: from then on its streams end, so the clients' EventSources
reconnect to another worker and resume, and the connections drain in a second rather
than holding the worker for as long as a reply lasts. Outside gunicorn nothing drains.
"""

from __future__ import annotations

import logging
import sys
import time

from flask import Flask

log = logging.getLogger(__name__)
_worker = None  # the gunicorn worker object of this process, if any
_restart_deferred_since: float | None = None
_max_requests: int | None = None  # the worker's own limit, while a restart is deferred


def watch_worker(worker) -> None:
    global _worker
    _worker = worker


def draining() -> bool:
    """Whether this process has stopped taking requests and is finishing up."""
    return _worker is not None and not _worker.alive


def _runs_chatapp(app) -> bool:
    # gunicorn.conf.py may serve another WSGI app (the benchmarks' comparison apps).
    from chatapp.chat.runner import EXTENSION_KEY

    return EXTENSION_KEY in getattr(app, "extensions", {})


def worker_started(app: Flask) -> None:
    """Begin background work at once, not at the first request: orphaned replies are
    taken over by a fresh worker straight away."""
    from chatapp.chat.sweeper import get_sweeper

    if _runs_chatapp(app):
        get_sweeper(app).ensure_started()


def defer_restart(app: Flask) -> bool:
    """Whether a worker due for its max_requests restart should keep serving for now.

    A restart waits for the worker's replies (up to REPLY_HANDOVER_SECONDS), but an exiting
    worker serves nothing, and its replacement only starts once it is gone: with every
    worker due at about the same time, the whole service would stop answering for as long
    as a reply lasts. So a worker running replies keeps serving past max_requests until
    they end or that time has passed; then it restarts, handing over what still runs.
    """
    global _restart_deferred_since
    from chatapp.chat.runner import get_runner

    if not get_runner(app).running():
        _restart_deferred_since = None
        return False
    now = time.monotonic()
    if _restart_deferred_since is None:
        _restart_deferred_since = now
        log.info("restart due, deferred while this worker's replies run")
    return now - _restart_deferred_since < float(app.config["REPLY_HANDOVER_SECONDS"])


def pace_restart(worker) -> None:
    """Before each request (gunicorn's pre_request): defer a due max_requests restart while
    replies run here (defer_restart), and let it happen once they are done.

    Deferring sets the worker's limit out of reach rather than one request further, since
    gthread counts requests on several threads at once.
    """
    global _max_requests
    limit = worker.max_requests if _max_requests is None else _max_requests
    if worker.nr + 1 < limit or not _runs_chatapp(worker.wsgi):
        return
    if defer_restart(worker.wsgi):
        if _max_requests is None:
            _max_requests = worker.max_requests
            worker.max_requests = sys.maxsize
    elif _max_requests is not None:
        worker.max_requests, _max_requests = _max_requests, None  # due: this request restarts it


def worker_exiting(app: Flask, limit: float | None = None) -> None:
    """Let running replies finish for REPLY_HANDOVER_SECONDS (at most ``limit``, what the
    server allows an exiting worker), then hand the rest over."""
    from chatapp.chat.runner import get_runner

    if not _runs_chatapp(app):
        return
    grace = float(app.config["REPLY_HANDOVER_SECONDS"])
    get_runner(app).shutdown(grace if limit is None else min(grace, limit))
