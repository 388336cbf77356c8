"""Real servers: gunicorn serving an app with the repository's gunicorn.conf.py on a free
loopback port, its log in a file. The tests serve chatapp; the benchmarks also serve the
apps chatapp is compared with (bench/textbook_app.py and the others)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.support.databases import ROOT, SECRET_KEY

# What the tests run chatapp with, as in the in-process tests: fast password hashing, and
# rate limits on only where a test asks (config={"RATELIMIT_ENABLED": "true"}).
TEST_CONFIG = {"PASSWORD_HASH_METHOD": '"pbkdf2:sha256:1000"', "RATELIMIT_ENABLED": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def terminate(process: subprocess.Popen | None, grace: float, kill=None) -> None:
    """SIGTERM ``process`` if it runs; if it has not exited after ``grace`` seconds,
    ``kill()`` it (by default SIGKILL, then wait)."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        if kill is not None:
            kill()
        else:
            process.kill()
            process.wait(10)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ")" field 3 is the state: utime and stime are fields 14 and 15 overall.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_kb(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except OSError:
        return 0


class GunicornServer:
    """``gunicorn -c gunicorn.conf.py APP`` on 127.0.0.1, for a test or a benchmark.

    ``config``: chatapp settings, set as CHATAPP_<KEY>, over ``defaults`` (TEST_CONFIG unless
    a benchmark gives its own); ``env``: further environment variables as they are.
    ``workers``/``threads`` None: gunicorn.conf.py decides (the shipped defaults). The log
    goes to ``log_dir/gunicorn-[NAME-]PORT.log`` (/tmp when no ``log_dir``).
    """

    def __init__(
        self,
        database_uri: str,
        *,
        app: str = "wsgi:app",
        workers: int | None = 2,
        threads: int | None = 8,
        config: dict | None = None,
        env: dict | None = None,
        extra_args: list[str] | None = None,
        log_dir: str | Path | None = None,
        name: str | None = None,
        defaults: dict = TEST_CONFIG,
    ):
        self.name = name or app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "CHATAPP_SECRET_KEY": SECRET_KEY,
            "CHATAPP_SQLALCHEMY_DATABASE_URI": database_uri,
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn.conf.py makes one per server
        for key, value in {**defaults, **(config or {})}.items():
            self.env[f"CHATAPP_{key}"] = str(value)
        for key, value in (env or {}).items():
            self.env[key] = str(value)
        self.workers = workers if workers is not None else int(self.env.get("CHATAPP_WORKERS", "2"))
        self.args = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(ROOT / "gunicorn.conf.py"),
            "--bind",
            f"127.0.0.1:{self.port}",
            # gunicorn 27's control socket has one default path per user:
            # concurrent servers would fight over it.
            "--no-control-socket",
        ]
        if workers is not None:
            self.args += ["--workers", str(workers)]
        if threads is not None:
            self.args += ["--threads", str(threads)]
        self.args += [*(extra_args or []), app]
        prefix = f"gunicorn-{name}-" if name else "gunicorn-"
        self.log_path = Path(log_dir or "/tmp") / f"{prefix}{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> GunicornServer:
        """Start gunicorn and wait until /healthz answers and every worker is up."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - gunicorn writes to it until stop()
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name}: gunicorn exited early:\n{self.log()}")
            try:
                if (
                    requests.get(self.url + "/healthz", timeout=1).status_code == 200
                    and len(self.worker_pids()) >= self.workers
                ):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name}: gunicorn did not start in {timeout} s:\n{self.log()}")

    def log_text(self) -> str:
        """The whole log: gunicorn's, the app's and the access log."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log(self, chars: int = 5000) -> str:
        """The end of the log, for a failure message."""
        return self.log_text()[-chars:]

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return sorted(int(pid) for pid in children.split())

    def cpu_seconds(self) -> float:
        """User + system CPU of the master and its current workers."""
        pids = [self.process.pid, *self.worker_pids()] if self.process else []
        return sum(process_cpu_seconds(pid) for pid in pids)

    def rss_kb(self) -> dict[int, int]:
        return {pid: process_rss_kb(pid) for pid in self.worker_pids()}

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            workers = self.worker_pids()
            terminate(self.process, 40)
            for pid in workers:  # a worker that outlived its master (never seen, but bounded)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()

    def __enter__(self) -> GunicornServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
