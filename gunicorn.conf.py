"""gunicorn settings for chatapp (docs/deployment.md explains each choice).

Precedence, as gunicorn documents it: this file, then GUNICORN_CMD_ARGS, then the
command line. So ``GUNICORN_CMD_ARGS="--bind 0.0.0.0:9000 --workers 4"`` overrides
anything below without editing the file, and so do the CHATAPP_* variables read here.
"""

import os
import shlex
import sys


def _worker_class() -> str:
    """The worker class this server will run: -k/--worker-class on the command line or in
    GUNICORN_CMD_ARGS wins over CHATAPP_WORKER_CLASS, as gunicorn's precedence has it."""
    chosen = os.environ.get("CHATAPP_WORKER_CLASS", "gthread")
    for args in (shlex.split(os.environ.get("GUNICORN_CMD_ARGS", "")), sys.argv[1:]):
        for index, arg in enumerate(args):
            if arg in ("-k", "--worker-class") and index + 1 < len(args):
                chosen = args[index + 1]
            elif arg.startswith("--worker-class="):
                chosen = arg.partition("=")[2]
            elif arg.startswith("-k") and len(arg) > 2:
                chosen = arg[2:]
    return chosen


# gevent: patch the standard library here, in the master, before anything else imports.
# gunicorn's gevent worker patches only when it starts (init_process), after post_fork and
# --preload have imported chatapp, SQLAlchemy and psycopg; psycopg picks its wait function
# when first imported (its C one, which would block the hub, unless select is patched), and
# threading.Lock objects made before the patch stay real locks. Patched here, everything
# the workers inherit is cooperative; the worker's own patch_all() then finds it done.
USES_GEVENT = "gevent" in _worker_class().lower()
if USES_GEVENT:
    from gevent import monkey

    monkey.patch_all()

import shutil  # noqa: E402 - after the patch
import tempfile  # noqa: E402

# prometheus_client picks single- or multi-process mode when it is first imported, so
# this must happen before any worker loads the app: every worker then writes its metrics
# to files here, and GET /metrics, answered by any one worker, reports all of them.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chatapp-metrics-")
    os.environ["_CHATAPP_OWNS_METRICS_DIR"] = "1"

bind = os.environ.get("CHATAPP_BIND", "127.0.0.1:8000")
# Streamed replies keep a request open for as long as the bot talks. gthread gives
# each worker a pool of threads, so a long stream ties up one thread, not a process.
# gevent (PostgreSQL only; docs/deployment.md, "Many open streams: the gevent worker")
# gives it a greenlet instead: thousands of open streams per worker.
worker_class = os.environ.get("CHATAPP_WORKER_CLASS", "gthread")
workers = int(os.environ.get("CHATAPP_WORKERS", "2"))
threads = int(os.environ.get("CHATAPP_THREADS", "32"))
# gevent: the most connections (open streams included) one worker serves at once; more
# wait in the listen backlog. Each needs a file descriptor (LimitNOFILE).
worker_connections = int(os.environ.get("CHATAPP_WORKER_CONNECTIONS", "1000"))
# A stream sends data at least every few seconds; a worker silent this long is stuck.
timeout = int(os.environ.get("CHATAPP_WORKER_TIMEOUT", "60"))
# On HUP, max_requests or TERM, a worker stops accepting and gets this long to finish
# the requests it has (streams included) before it is killed.
graceful_timeout = int(os.environ.get("CHATAPP_GRACEFUL_TIMEOUT", "30"))
# Within that, replies still running get REPLY_HANDOVER_SECONDS, at most graceful_timeout
# minus a margin, to finish before they are handed over to other workers (worker_exit
# below), so the master's SIGKILL at graceful_timeout never lands on a reply.
HANDOVER_MARGIN = 5
keepalive = 5
# gunicorn 25+ opens a control socket for gunicornc at one path per user, which two
# instances on a host (or parallel test servers) would fight over. Signals (HUP, TERM,
# TTIN/TTOU) do the same job; set CHATAPP_CONTROL_SOCKET=/path to have one anyway.
control_socket = os.environ.get("CHATAPP_CONTROL_SOCKET", "")
control_socket_disable = not control_socket
# Recycle workers now and then (slow leaks in any library); the jitter keeps them from
# all restarting at the same moment.
max_requests = int(os.environ.get("CHATAPP_MAX_REQUESTS", "10000"))
max_requests_jitter = int(os.environ.get("CHATAPP_MAX_REQUESTS_JITTER", "1000"))

accesslog = os.environ.get("CHATAPP_ACCESS_LOG", "-")
# Common log format plus the request id (X-Request-ID, set or echoed by the app) and
# the time to the last byte sent, in milliseconds (a stream's whole life).
access_log_format = (
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" request_id=%({x-request-id}o)s duration_ms=%(M)s'
)


def on_starting(server):
    """Refuse gevent on SQLite before any worker starts; start from empty metric files
    (values left by a previous run would be added in)."""
    if USES_GEVENT:
        _check_gevent_database(server)
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def _check_gevent_database(server):
    """Exit with one clear line if the app's settings cannot run under gevent (SQLite)."""
    from chatapp import load_config
    from chatapp.config import ConfigError, check_worker_model

    try:
        check_worker_model(load_config())
    except ConfigError as error:
        server.log.error("%s", error)
        sys.exit(1)


def post_fork(server, worker):
    """Drop pooled connections inherited from the master (``--preload``).

    ``close=False``: the parent still owns those sockets; closing them here would
    send a terminate message down a connection the parent may be using.
    """
    from chatapp.db import dispose_engines_after_fork

    dispose_engines_after_fork()


def post_worker_init(worker):
    """Let the app see when this worker starts shutting down, and start its reply sweep."""
    from chatapp import lifecycle

    lifecycle.watch_worker(worker)
    lifecycle.worker_started(worker.wsgi)


def pre_request(worker, req):
    """Defer a max_requests restart while this worker's replies run (chatapp.lifecycle)."""
    from chatapp import lifecycle

    lifecycle.pace_restart(worker)


def worker_exit(server, worker):
    """In the exiting worker: finish or hand over its replies before the process ends."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        from chatapp import lifecycle

        # Past graceful_timeout the master kills a worker it is stopping, and past timeout
        # one that has stopped sending heartbeats, as an exiting worker has.
        limit = min(worker.cfg.graceful_timeout, worker.cfg.timeout) - HANDOVER_MARGIN
        lifecycle.worker_exiting(app, limit=max(0, limit))


def child_exit(server, worker):
    """A dead worker's live gauges (its pool) must stop being reported."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if os.environ.get("_CHATAPP_OWNS_METRICS_DIR") == "1":
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
