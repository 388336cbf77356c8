"""The serving process's life: whether it is shutting down, and what it does on exit.

gunicorn (gunicorn.conf.py) hands its worker over when the worker starts, and calls
``worker_exiting`` when it ends. A worker that stops accepting (TERM, HUP, max_requests)
sets ``worker.alive = False``: from then on its streams end, so the clients' EventSources
reconnect to another worker and resume, and the connections drain in a second rather
than holding the worker for as long as a reply lasts. Outside gunicorn nothing drains.
"""

from __future__ import annotations

import logging

from flask import Flask

log = logging.getLogger(__name__)
_worker = None  # the gunicorn worker object of this process, if any


def watch_worker(worker) -> None:
    global _worker
    _worker = worker


def draining() -> bool:
    """Whether this process has stopped taking requests and is finishing up."""
    return _worker is not None and not _worker.alive


def worker_started(app: Flask) -> None:
    """Begin background work at once, not at the first request: orphaned replies are
    taken over by a fresh worker straight away."""
    from chatapp.chat.sweeper import get_sweeper

    get_sweeper(app).ensure_started()


def worker_exiting(app: Flask) -> None:
    """Let running replies finish for REPLY_HANDOVER_SECONDS, then hand the rest over."""
    from chatapp.chat.runner import get_runner

    get_runner(app).shutdown(float(app.config["REPLY_HANDOVER_SECONDS"]))
