"""The servers a benchmark compares: chatapp (``wsgi:app``) and the apps it is measured
against (bench/textbook_app.py, ceiling_app.py, core_floor_app.py), each under the same
``gunicorn -c gunicorn.conf.py`` on a free loopback port (tests/support/servers.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from bench.lifecycle import on_exit
from tests.support.servers import GunicornServer

# chatapp as shipped, but for the per-user bounds: a benchmark loads the server through one
# user, and the bounds that keep one user from taking the server from the others would
# refuse it. The checks still run, at the cost they have in production.
BENCH_CONFIG = {
    "RATELIMIT_MESSAGES": "1000000 per minute",
    "RATELIMIT_REGENERATE": "1000000 per minute",
    "RATELIMIT_CONVERSATIONS": "1000000 per minute",
    "STREAMS_PER_USER": 100000,
}


class Server(GunicornServer):
    """gunicorn -c gunicorn.conf.py APP, its log in ``workdir``, stopped when the script ends.

    ``workers``/``threads`` None: gunicorn.conf.py decides (the shipped defaults).
    ``env``: extra variables (CHATAPP_* settings, read by chatapp and the compared apps alike).
    """

    def __init__(
        self,
        app: str,
        database_uri: str,
        workdir: Path,
        *,
        name: str,
        workers: int | None = None,
        threads: int | None = None,
        env: dict | None = None,
    ):
        super().__init__(
            database_uri,
            app=app,
            workers=workers,
            threads=threads,
            env=env,
            log_dir=workdir,
            name=name,
            defaults=BENCH_CONFIG,
        )

    def start(self, timeout: float = 60.0) -> Server:
        on_exit(self.stop)
        return super().start(timeout)


def connections_by_worker(server: Server) -> dict[int, int]:
    """Established client connections held by each worker now (``ss``), to see how the
    kernel's accept race spread keep-alive clients over the workers."""
    try:
        out = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( sport = :{server.port} )"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return {pid: n for pid, n in counts.items() if pid in server.worker_pids()}
