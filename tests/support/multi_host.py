"""chatapp on several hosts (tests/support/hosts.py), for tests/test_multi_host.py and bench/multi_host.py.

Two kinds of host: app hosts run gunicorn (gthread), reply-worker hosts run
``celery --app chatapp.jobs worker --pool threads``, all in queue mode with REPLY_EVENTS
(on the queue's Redis). The shared services listen on the gateway address: PostgreSQL
through a PgBouncer of the run's own (the server itself listens on loopback only), a
redis-server of the run's own (restartable: it keeps nothing), the model (a fake
OpenAI-compatible server streaming a known text per message, logging when it sent each
first token) and HAProxy, round-robin over the app hosts. Clients post and stream through
HAProxy as a browser would: Idempotency-Key on the post, Last-Event-ID on a reconnect.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
import sqlalchemy as sa

from tests.support import pgbouncer
from tests.support.databases import ROOT, SECRET_KEY, inspect_db
from tests.support.hosts import HAProxy, Host, Topology
from tests.support.load import wait_until
from tests.support.queue import RedisServer
from tests.support.servers import TEST_CONFIG, GunicornServer
from tests.support.sse import iter_events


def words_for(content: str, count: int) -> list[str]:
    """The model's reply to a message: ``count`` words naming the message, so no two replies match."""
    return [f" {content.replace(' ', '-')}/w{n}" for n in range(count)]


class ChatModel:
    """A fake OpenAI-compatible model on ``address``: ``words`` words per reply, ``delay`` s apart,
    the first after ``first_delay`` s (a real model's reading of the prompt).

    ``first_sent[content]`` lists when (time.time()) each request for that message got its
    first token, for time-to-first-token measured from the model's own send.
    """

    def __init__(self, address: str, words: int, delay: float, first_delay: float = 0.0):
        self.words = words
        self.delay = delay
        self.first_delay = first_delay
        self.first_sent: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Each token leaves at once (TCP_NODELAY), as model servers send them.
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                content = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for index, word in enumerate(words_for(content, model.words)):
                        time.sleep(model.delay if index else model.first_delay)
                        chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        if index == 0:
                            with model._lock:
                                model.first_sent.setdefault(content, []).append(time.time())
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except OSError:
                    pass  # the worker went away (killed, or its run was stopped)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # hundreds of replies start at once

        self.httpd = Server((address, 0), Handler)
        self.base_url = f"http://{address}:{self.httpd.server_address[1]}/v1"

    def expected(self, content: str) -> str:
        return "".join(words_for(content, self.words))

    def __enter__(self) -> ChatModel:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


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
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
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
            old.process.kill()
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


def sign_up(url: str, conversations: int) -> tuple[str, list[int]]:
    """A user, an API token and ``conversations`` conversations, through the load balancer."""
    credentials = {"username": f"chatter{uuid.uuid4().hex[:8]}", "password": "correct horse"}
    assert requests.post(url + "/api/v1/users", json=credentials, timeout=30).status_code == 201
    token = requests.post(url + "/api/v1/tokens", json=credentials, timeout=30).json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    with requests.Session() as session:
        ids = [
            session.post(url + "/api/v1/conversations", json={}, headers=headers, timeout=30).json()["id"]
            for _ in range(conversations)
        ]
    return token, ids


@dataclass
class Chat:
    """One chat's message and what its client saw."""

    conversation_id: int
    content: str
    acknowledged: bool = False
    reply_id: int | None = None
    post_host: str | None = None
    post_attempts: int = 0
    stream_hosts: list[str] = field(default_factory=list)
    connections: int = 0
    resets: int = 0
    text: str = ""
    status: str | None = None
    stream_opened_at: float | None = None  # time.time() at the client: its first stream answered
    first_text_at: float | None = None
    done_at: float | None = None
    problems: list[str] = field(default_factory=list)


def run_chat(url: str, token: str, chat: Chat, deadline: float) -> Chat:
    """Post ``chat``'s message (again, same Idempotency-Key, until acknowledged), then stream its
    reply to the end, reconnecting with Last-Event-ID whenever the stream breaks."""
    headers = {"Authorization": f"Bearer {token}"}
    messages = f"{url}/api/v1/conversations/{chat.conversation_id}/messages"
    key = uuid.uuid4().hex
    with requests.Session() as session:
        while not chat.acknowledged and time.monotonic() < deadline:
            chat.post_attempts += 1
            try:
                response = session.post(
                    messages, json={"content": chat.content}, headers={**headers, "Idempotency-Key": key}, timeout=30
                )
            except requests.RequestException as error:
                chat.problems.append(f"post: {type(error).__name__}: {str(error)[-80:]}")
                time.sleep(0.2)
                continue
            if response.status_code == 202:
                chat.acknowledged = True
                chat.reply_id = response.json()["reply"]["id"]
                chat.post_host = response.headers.get("X-Served-By")
            else:
                chat.problems.append(f"post: {response.status_code}")
                time.sleep(min(float(response.headers.get("Retry-After", 0.5)), 1.0))
        if not chat.acknowledged:
            return chat
        text: list[str] = []
        last_id = None
        while time.monotonic() < deadline:
            chat.connections += 1
            resume = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with session.get(
                    f"{messages}/{chat.reply_id}/stream", headers={**headers, **resume}, stream=True, timeout=(5, 30)
                ) as response:
                    if response.status_code != 200:
                        chat.problems.append(f"stream: {response.status_code}")
                        time.sleep(0.2)
                        continue
                    chat.stream_hosts.append(response.headers.get("X-Served-By", "?"))
                    if chat.stream_opened_at is None:
                        chat.stream_opened_at = time.time()
                    for event in iter_events(response.iter_content(chunk_size=None)):
                        last_id = event.id or last_id
                        if event.name == "message":
                            if chat.first_text_at is None:
                                chat.first_text_at = time.time()
                            text.append(event.data)
                        elif event.name == "reset":
                            text.clear()
                            chat.resets += 1
                        elif event.name == "done":
                            chat.done_at = time.time()
                            chat.status = json.loads(event.data)["status"]
                            chat.text = "".join(text)
                            return chat
            except requests.RequestException as error:
                chat.problems.append(f"stream: {type(error).__name__}: {str(error)[-80:]}")
            # As an EventSource would, after the server's "retry:" (1 s), shortened here.
            time.sleep(0.1)
        chat.text = "".join(text)
        return chat


def epoch(moment) -> float:
    """A timezone-aware (or naive UTC) datetime as time.time() seconds."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
