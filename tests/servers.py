"""Real servers for tests: gunicorn serving chatapp on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
# Servers and commands run without TESTING, so they need a key the start-up check accepts
# (32 bytes or more). A fixed one: every test server signs with the same key.
SECRET_KEY = "chatapp-test-servers-only-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def migrate(database_uri: str) -> None:
    """Bring a database to the latest schema with the real CLI."""
    env = {**os.environ, "CHATAPP_SQLALCHEMY_DATABASE_URI": database_uri, "CHATAPP_SECRET_KEY": SECRET_KEY}
    subprocess.run(
        [sys.executable, "-m", "flask", "--app", "chatapp", "init-db"],
        env=env, check=True, capture_output=True, cwd=ROOT, timeout=120,
    )


class GunicornServer:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` with CHATAPP_* settings, on 127.0.0.1."""

    def __init__(self, database_uri: str, *, workers: int = 2, threads: int = 8,
                 config: dict | None = None, extra_args: list[str] | None = None,
                 instance_path: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "CHATAPP_SECRET_KEY": SECRET_KEY,
            "CHATAPP_SQLALCHEMY_DATABASE_URI": database_uri,
            "CHATAPP_PASSWORD_HASH_METHOD": '"pbkdf2:sha256:1000"',
            # As in the in-process tests: on only where a test asks (config={"RATELIMIT_ENABLED": "true"}).
            "CHATAPP_RATELIMIT_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
        for key, value in (config or {}).items():
            self.env[f"CHATAPP_{key}"] = str(value)
        self.args = [
            sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
            "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers),
            "--threads", str(threads),
            # gunicorn 27's control socket has one default path per user: concurrent
            # test servers would fight over it.
            "--no-control-socket",
            *(extra_args or []), "wsgi:app",
        ]
        self.process: subprocess.Popen | None = None
        self.log_path = Path(instance_path or "/tmp") / f"gunicorn-{self.port}.log"

    def start(self, timeout: float = 30.0) -> GunicornServer:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - gunicorn writes to it until stop()
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.log()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
        ).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
