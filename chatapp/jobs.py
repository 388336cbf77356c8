"""The reply workers' entry point: ``celery --app chatapp.jobs worker --pool threads``.

Builds the Flask app from the same configuration as the web processes (instance
config.py and CHATAPP_* variables), whose REPLY_QUEUE must name the Redis broker, and
exposes its Celery app. When the worker is ready it starts this process's reply sweep
(which enqueues orphaned replies again) and, with QUEUE_WORKER_METRICS_PORT, serves its
metrics. Replies run on the pool's threads, each task with its own short units of work.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutting_down

from chatapp import create_app
from chatapp.chat.queue import CELERY_KEY, get_worker_runner
from chatapp.chat.sweeper import get_sweeper

log = logging.getLogger(__name__)

flask_app = create_app()
if not flask_app.config.get("REPLY_QUEUE"):
    raise RuntimeError(
        "chatapp.jobs runs reply workers for queue mode: set CHATAPP_REPLY_QUEUE to the Redis URL "
        "(e.g. redis://127.0.0.1:6379/5), the same as the web processes'"
    )
celery = flask_app.extensions[CELERY_KEY]


@worker_ready.connect
def _worker_ready(**_kwargs) -> None:
    port = int(flask_app.config["QUEUE_WORKER_METRICS_PORT"])
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr="127.0.0.1")
    sweeper = get_sweeper(flask_app)
    sweeper.queue_worker = True
    sweeper.ensure_started()
    log.info("reply worker ready: sweeping every %s s", flask_app.config["REPLY_SWEEP_INTERVAL"])


@worker_shutting_down.connect
def _worker_shutting_down(**_kwargs) -> None:
    # A warm shutdown (TERM) waits for the running tasks. As a web worker does, let them
    # finish for REPLY_HANDOVER_SECONDS, then hand the rest over: their runs end, their
    # leases are released, and another worker's sweep enqueues them again at once (a
    # hand-over does not count against REPLY_MAX_RUNS). A cold shutdown (a second TERM,
    # KILL) leaves them to their leases.
    runner = get_worker_runner(flask_app)
    log.info("reply worker shutting down: %d repl(ies) running", len(runner.running()))
    grace = float(flask_app.config["REPLY_HANDOVER_SECONDS"])
    threading.Thread(target=runner.shutdown, args=(grace,), name="reply-handover", daemon=True).start()
