"""gunicorn settings for chatapp.

Precedence, as gunicorn documents it: this file, then GUNICORN_CMD_ARGS, then the
command line. So ``GUNICORN_CMD_ARGS="--bind 0.0.0.0:9000 --workers 4"`` overrides
anything below without editing the file.
"""

import os

bind = os.environ.get("CHATAPP_BIND", "127.0.0.1:8000")
# Streamed replies keep a request open for as long as the bot talks. gthread gives
# each worker a pool of threads, so a long stream ties up one thread, not a process.
worker_class = "gthread"
workers = int(os.environ.get("CHATAPP_WORKERS", "2"))
threads = int(os.environ.get("CHATAPP_THREADS", "32"))
# A stream sends data at least every few seconds; a worker silent this long is stuck.
timeout = int(os.environ.get("CHATAPP_WORKER_TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("CHATAPP_GRACEFUL_TIMEOUT", "30"))
keepalive = 5


def post_fork(server, worker):
    """Drop pooled connections inherited from the master (``--preload``).

    ``close=False``: the parent still owns those sockets; closing them here would
    send a terminate message down a connection the parent may be using.
    """
    from chatapp.db import dispose_engines_after_fork

    dispose_engines_after_fork()
