"""Queue mode's processes for tests and benchmarks: a Redis of their own, and Celery reply
workers started as docs/deployment.md starts them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from tests.support.databases import ROOT, SECRET_KEY
from tests.support.load import wait_until
from tests.support.metrics import scrape, total
from tests.support.servers import free_port, terminate


class RedisServer:
    """``redis-server`` on a free port of ``host`` (loopback by default), nothing saved: stop() loses every job."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        self.url = f"redis://{host}:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no"]
        if self.host != "127.0.0.1":
            args += ["--protected-mode", "no"]  # reached from other hosts (network namespaces)
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        assert wait_until(lambda: _answers(client), 10), "redis-server did not start"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=1)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class CeleryWorker:
    """``celery --app chatapp.jobs worker --pool threads``, as docs/deployment.md runs it."""

    def __init__(self, database_uri: str, queue_url: str, log_dir: Path, config: dict, concurrency: int = 4) -> None:
        self.concurrency = concurrency
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "CHATAPP_SECRET_KEY": SECRET_KEY,
            "CHATAPP_SQLALCHEMY_DATABASE_URI": database_uri,
            "CHATAPP_REPLY_QUEUE": queue_url,
            "CHATAPP_QUEUE_WORKER_METRICS_PORT": str(self.metrics_port),
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        for key, value in config.items():
            self.env[f"CHATAPP_{key}"] = str(value)
        self.log_path = log_dir / f"celery-{self.metrics_port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> CeleryWorker:
        """Start the worker; with ``wait``, until it is ready (connected to Redis, metrics served)."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - the worker writes to it until it ends
        args = [sys.executable, "-m", "celery", "--app", "chatapp.jobs", "worker", "--pool", "threads"]
        args += ["--concurrency", str(self.concurrency), "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        args += ["--hostname", f"w{self.metrics_port}@localhost"]
        self.process = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        # Its metrics server starts when the worker is ready to take jobs.
        assert not wait or wait_until(lambda: self.process.poll() is None and self.metrics() is not None, 30), (
            self.log()
        )
        return self

    def metrics(self):
        return scrape(f"http://127.0.0.1:{self.metrics_port}", timeout=2)

    def outcomes(self, outcome: str) -> float:
        return total(self.metrics(), "chatapp_reply_queue_jobs_total", outcome=outcome)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        terminate(self.process, 20, self.kill)
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()

    def __enter__(self) -> CeleryWorker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
