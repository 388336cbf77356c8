"""chatapp on several hosts (tests/support/hosts.py), for tests/test_multi_host.py and bench/multi_host.py.

Two kinds of host: app hosts run gunicorn (gthread), reply-worker hosts run
``celery --app chatapp.jobs worker --pool threads``, all in queue mode with REPLY_EVENTS
(on the queue's Redis). The shared services listen on the gateway address: PostgreSQL
through a PgBouncer of the run's own (the server itself listens on loopback only), a
redis-server of the run's own (restartable: it keeps nothing), the model (a fake
OpenAI-compatible server streaming a known text per message, logging when it sent each
first token, tests/support/chats.py) and HAProxy, round-robin over the app hosts, which
the chats' clients post and stream through.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from tests.support import pgbouncer
from tests.support.chats import Chat, ChatModel
from tests.support.databases import ROOT, SECRET_KEY, inspect_db
from tests.support.hosts import HAProxy, Host, Topology
from tests.support.load import wait_until
from tests.support.queue import RedisServer
from tests.support.servers import TEST_CONFIG, GunicornServer, terminate


class AppHost(GunicornServer):
    """gunicorn on ``host``'s address and ``port`` (kept across restarts)."""

    def __init__(self, host: Host, port: int, database_uri: str, config: dict, log_dir: Path, threads: int):
        super().__init__(database_uri, workers=2, threads=threads, config=config, log_dir=log_dir, name=host.name)
        self.host = host
        self.port = port
        self.url = f"http://{host.address}:{port}"
        self.args[self.args.index("--bind") + 1] = f"{host.address}:{port}"
        self.args = host.command(self.args)
        self.log_path = log_dir / f"gunicorn-{host.name}-{time.monotonic_ns()}.log"


class WorkerHost:
    """A Celery reply worker on ``host``, in a process group of its own (SIGKILLed as a whole),
    started again whenever it exits without being stopped, as systemd's ``Restart=on-failure``
    does (docs/deployment.md): ``exits`` lists the return codes it was restarted after."""

    RESTART_SECONDS = 0.5

    def __init__(self, host: Host, database_uri: str, config: dict, log_dir: Path, concurrency: int):
        self.host = host
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "CHATAPP_SECRET_KEY": SECRET_KEY}
        self.env["CHATAPP_SQLALCHEMY_DATABASE_URI"] = database_uri
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        for key, value in config.items():
            self.env[f"CHATAPP_{key}"] = str(value)
        self.args = [sys.executable, "-m", "celery", "--app", "chatapp.jobs", "worker", "--pool", "threads"]
        self.args += ["--concurrency", str(concurrency), "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        self.args += ["--hostname", f"{host.name}@{uuid.uuid4().hex[:8]}"]
        self.log_path = log_dir / f"celery-{host.name}-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen | None = None
        self.exits: list[int] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    def start(self) -> WorkerHost:
        self._launch()
        self._supervisor = threading.Thread(target=self._supervise, name=f"supervise-{self.host.name}", daemon=True)
        self._supervisor.start()
        return self

    def _launch(self) -> None:
        ready_before = self.log().count("reply worker ready")
        with self._lock:
            if self._stopping.is_set():
                return
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - the worker writes to it until it ends
            self.process = subprocess.Popen(
                self.host.command(self.args),
                cwd=ROOT,
                env=self.env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            process = self.process
        ready = wait_until(
            lambda: process.poll() is not None or self.log().count("reply worker ready") > ready_before, 60
        )
        assert ready and (process.poll() is None or self._stopping.is_set()), self.log()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.1):
            process = self.process
            if process is None or process.poll() is None:
                continue
            with self._lock:
                if self._stopping.is_set():
                    return
                self.exits.append(process.returncode)
                self._log.close()
            time.sleep(self.RESTART_SECONDS)
            with contextlib.suppress(AssertionError):  # seen by the test: the replies never finish
                self._launch()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the worker's whole process group: no acknowledgement, no hand-over."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(70)
        terminate(self.process, 30, self.kill)
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()


# Short leases: a killed worker's replies are taken over within about lease + sweep seconds.
LEASES = {
    "REPLY_LEASE_SECONDS": 2,
    "REPLY_LEASE_RENEW_SECONDS": 0.5,
    "REPLY_STOP_CHECK_SECONDS": 0.5,
    "REPLY_SWEEP_INTERVAL": 0.5,
    "REPLY_HANDOVER_SECONDS": 2,
}


class Cluster:
    """The whole topology: ``app_hosts`` gunicorns and ``worker_hosts`` Celery workers behind HAProxy."""

    def __init__(
        self,
        database_uri: str,
        log_dir: Path,
        *,
        words: int,
        delay: float,
        first_delay: float = 0.0,
        app_hosts: int = 2,
        worker_hosts: int = 2,
        threads: int = 128,
        concurrency: int = 200,
        namespaces: bool | None = None,
        colocate: bool = False,
    ):
        self.database_uri = database_uri
        self.log_dir = log_dir
        self.stack = contextlib.ExitStack()
        # colocate: the reply workers run on the app hosts (worker n on app host n).
        self.colocate = colocate
        self.topology = Topology(app_hosts if colocate else app_hosts + worker_hosts, namespaces=namespaces)
        self.worker_count = worker_hosts
        self.words, self.delay, self.first_delay = words, delay, first_delay
        self.app_count, self.threads, self.concurrency = app_hosts, threads, concurrency
        self.apps: list[AppHost] = []
        self.workers: list[WorkerHost] = []

    def __enter__(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.stack.close()
            raise
        return self

    def _start(self) -> None:
        stack = self.stack
        gateway = stack.enter_context(self.topology).gateway
        bouncer = pgbouncer.PgBouncer(pgbouncer.direct(self.database_uri), pool_size=20)
        bouncer.host = gateway
        stack.enter_context(bouncer)
        self.redis = RedisServer(gateway)
        self.redis.start()
        stack.callback(self.redis.stop)
        self.model = stack.enter_context(ChatModel(gateway, self.words, self.delay, self.first_delay))
        self.config = {
            **TEST_CONFIG,
            **LEASES,
            "DATABASE_POOLER": "pgbouncer",
            "REPLY_QUEUE": self.redis.url,
            "REPLY_QUEUE_TIMEOUT": 1,
            "BOT_ENGINE": "openai",
            "OPENAI_BASE_URL": self.model.base_url,
            "TITLES_ENABLED": "false",
            # One user holds every chat's stream.
            "STREAMS_PER_USER": 1000,
        }
        uri = bouncer.url_for(pgbouncer.direct(self.database_uri))
        hosts = self.topology.hosts
        self.apps = [
            AppHost(host, host.free_port(), uri, self.config, self.log_dir, self.threads)
            for host in hosts[: self.app_count]
        ]
        worker_hosts = hosts[: self.worker_count] if self.colocate else hosts[self.app_count :]
        self.workers = [WorkerHost(host, uri, self.config, self.log_dir, self.concurrency) for host in worker_hosts]
        for app in self.apps:
            stack.callback(app.stop)
        for worker in self.workers:
            stack.callback(worker.stop)
        # Started side by side: each takes seconds on a busy machine.
        starting = [threading.Thread(target=process.start) for process in [*self.apps, *self.workers]]
        errors: list[BaseException] = []
        for thread in starting:
            thread.run = _catching(thread.run, errors)  # type: ignore[method-assign]
            thread.start()
        for thread in starting:
            thread.join(120)
        if errors:
            raise errors[0]
        servers = {app.host.name: f"{app.host.address}:{app.port}" for app in self.apps}
        self.haproxy = HAProxy(gateway, servers, self.log_dir)
        stack.callback(self.haproxy.stop)
        self.haproxy.start()
        self.url = self.haproxy.url

    def restart_app(self, index: int, *, kill: bool = False) -> None:
        """Stop an app host (SIGTERM, or SIGKILL) and start it again on the same address."""
        old = self.apps[index]
        if kill and old.process is not None:
            # The whole host dies: its workers too (they would outlive the master, holding the port).
            for pid in [*old.worker_pids(), old.process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            old.process.wait(10)
        old.stop()
        new = AppHost(
            old.host, old.port, old.env["CHATAPP_SQLALCHEMY_DATABASE_URI"], self.config, self.log_dir, self.threads
        )
        self.stack.callback(new.stop)
        new.start()
        self.apps[index] = new

    def restart_redis(self) -> None:
        """Kill redis-server and start an empty one on the same port."""
        self.redis.stop()
        self.redis.start()

    def logs(self) -> str:
        parts = [f"--- {app.host.name}\n{app.log(3000)}" for app in self.apps]
        parts += [f"--- {worker.host.name}\n{worker.log()[-3000:]}" for worker in self.workers]
        return "\n".join(parts)

    def __exit__(self, *exc) -> None:
        self.stack.close()


def _catching(run, errors: list[BaseException]):
    def wrapped() -> None:
        try:
            run()
        except BaseException as error:  # reported by the starting thread
            errors.append(error)

    return wrapped


def replies_written_by(database_uri: str, pid: int) -> list[int]:
    """Replies streaming with some text stored, whose lease the process ``pid`` holds (owner "host:pid:nonce")."""
    from chatapp.chat.models import Message, Status

    with inspect_db(database_uri) as session:
        rows = session.execute(
            sa.select(Message.id, Message.lease_owner).where(
                Message.status == Status.STREAMING, sa.func.length(Message.content) > 0
            )
        ).all()
    return [reply_id for reply_id, owner in rows if owner and owner.split(":")[1] == str(pid)]


@dataclass
class Faults:
    """What inject_faults did: the replies the killed worker was writing, and when (time.time())."""

    interrupted: list[int]
    killed_at: float


def inject_faults(cluster: Cluster, chats: list[Chat], *, at_least: int = 10) -> Faults:
    """SIGKILL reply worker 0 once it writes ``at_least`` replies, restart Redis empty, then
    restart app host 0 (SIGTERM, start again) while streams are open."""
    doomed = cluster.workers[0]
    assert doomed.process is not None
    pid = doomed.process.pid
    writing = wait_until(lambda: len(replies_written_by(cluster.database_uri, pid)) >= at_least, 90)
    assert writing, cluster.logs()
    interrupted = replies_written_by(cluster.database_uri, pid)
    killed_at = time.time()
    doomed.kill()
    cluster.restart_redis()
    assert wait_until(lambda: any(chat.stream_hosts and chat.status is None for chat in chats), 30)
    cluster.restart_app(0)
    return Faults(interrupted, killed_at)


def stored_messages(database_uri: str) -> list[tuple]:
    """(conversation id, role, content, status, runs, id, updated_at) of every message."""
    from chatapp.chat.models import Message

    with inspect_db(database_uri) as session:
        return [
            (row.conversation_id, row.role.value, row.content, row.status.value, row.runs, row.id, row.updated_at)
            for row in session.scalars(sa.select(Message)).all()
        ]
