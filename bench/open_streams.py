"""Many open streams on gunicorn's gevent worker: 2,000 SSE streams on 2 workers, PostgreSQL.

chatapp under ``gunicorn -c gunicorn.conf.py`` with CHATAPP_WORKER_CLASS=gevent, on a
PostgreSQL database of the run's own reached through a PgBouncer of its own (transaction
pooling, DATABASE_POOLER=pgbouncer). A slow fake model (tests/fake_openai.py, in a
process of its own) thinks for --ttft seconds (plus up to --ttft-jitter) before its first
word, then sends --words words, one every --word-delay seconds.

Replies run in-process, as greenlets of the worker that took the message (REPLY_WORKERS
raised to cover them): a reply waiting on the model costs a greenlet and a socket, and its
streams in the same process are woken from memory. A stream that lands on the other worker
waits for Redis notices (REPLY_EVENTS, a redis-server of the run's own) instead of polling the
database 5 times a second. Queue mode (Celery) would add a worker process on the same 2 cores
to do the same waiting.

The load generator is one asyncio loop (raw HTTP/1.1; its fd limit raised): it posts
--streams messages (each in a new conversation, --concurrency at a time), opens the reply
stream of each as soon as it is posted, and meanwhile sends a plain GET (the conversations
list, a database read) every --get-interval seconds, one at a time. It reports:

- streams opened / completed with the right text / errors;
- plain GET latency p50/p95/max while every stream is open and waiting ("hold"), and
  while the replies stream their words ("streaming");
- the most connections each worker had checked out (/metrics chatapp_db_pool_checked_out);
- RSS and open fds per worker before and with the streams open: memory per open stream
  (with its in-process reply) and the ``ulimit -n`` a worker needs.

    python bench/open_streams.py [--streams 2000] [--workers 2] [--ttft 240] [--recheck 30] [--no-pgbouncer]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import Server  # noqa: E402
from bench.databases import Database, backends, bench_postgres_url  # noqa: E402
from bench.lifecycle import on_exit, workdir  # noqa: E402
from bench.metrics import MetricsSampler  # noqa: E402
from bench.report import finish, fmt, machine_report, table  # noqa: E402
from tests.support import pgbouncer  # noqa: E402
from tests.support.load import percentile  # noqa: E402
from tests.support.queue import RedisServer  # noqa: E402
from tests.support.servers import process_rss_kb  # noqa: E402
from tests.support.sse import parse_events  # noqa: E402

PASSWORD = "bench-password"


def serve_model(args) -> None:
    """The fake model, in this process (started by the benchmark as a subprocess)."""
    from tests.fake_openai import FakeOpenAIServer

    words = [f" word{n}" for n in range(args.words)]
    model = FakeOpenAIServer(reply_words=words, delay=args.word_delay)
    model.first_token_delay, model.first_token_jitter = args.ttft, args.ttft_jitter
    model.httpd.socket.listen(4096)  # the class's backlog of 5 would drop a burst of connects
    with model:
        print(model.base_url, flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin


def start_model(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, __file__, "--serve-model", "--words", str(args.words)]
    command += ["--word-delay", str(args.word_delay), "--ttft", str(args.ttft), "--ttft-jitter", str(args.ttft_jitter)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    on_exit(process.kill)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Http:
    """A minimal HTTP/1.1 client on asyncio streams: cheap enough for thousands of open streams."""

    def __init__(self, port: int, token: str = ""):
        self.port = port
        self.token = token

    def _request(self, method: str, path: str, body: dict | None = None, close: bool = True) -> bytes:
        payload = json.dumps(body).encode() if body is not None else b""
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        lines.append("Connection: close" if close else "Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload

    async def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        """One request on a new connection: (status, body)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        try:
            writer.write(self._request(method, path, body))
            status, headers = await read_head(reader)
            return status, await read_body(reader, headers)
        finally:
            writer.close()

    async def stream(self, path: str, opened: asyncio.Event) -> tuple[int, bytes]:
        """GET an SSE stream to its end; ``opened`` is set once its headers arrive."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        try:
            writer.write(self._request("GET", path))
            status, headers = await read_head(reader)
            opened.set()
            return status, await read_body(reader, headers)
        finally:
            writer.close()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed before the status line")
    status = int(status_line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


def streamed_text(body: bytes) -> tuple[str, str | None]:
    """The text a client read from a reply's stream, and its ``done`` status."""
    text: list[str] = []
    status = None
    for name, data in parse_events(body):
        if name == "reset":
            text.clear()
        elif name == "message":
            text.append(data)
        elif name == "done":
            status = json.loads(data)["status"]
    return "".join(text), status


class Run:
    """One benchmark run's load and what it saw."""

    def __init__(self, args, server: Server, token: str):
        self.args = args
        self.server = server
        self.http = Http(server.port, token)
        self.expected = "".join(f" word{n}" for n in range(args.words))
        self.errors: list[str] = []
        self.opened = 0
        self.settled = 0
        self.completed = 0
        self.latencies: dict[str, list[float]] = {"idle": [], "hold": [], "streaming": []}
        self.phase = "idle"
        self.rss_before: dict[int, int] = {}
        self.fds_before: dict[int, int] = {}
        self.rss_with: dict[int, int] = {}
        self.fds_with: dict[int, int] = {}
        self.setup_seconds = 0.0

    async def one_stream(self, slots: asyncio.Semaphore, all_settled: asyncio.Event) -> None:
        """Post a message, open its reply's stream, read it to the end and check the text."""
        opened = asyncio.Event()
        try:
            async with slots:
                status, body = await self.http.call("POST", "/api/v1/conversations", {})
                if status != 201:
                    raise RuntimeError(f"conversation {status}: {body[:200]!r}")
                messages = f"/api/v1/conversations/{json.loads(body)['id']}/messages"
                status, body = await self.http.call("POST", messages, {"content": "think slowly"})
                if status != 202:
                    raise RuntimeError(f"message {status}: {body[:200]!r}")
            reply_id = json.loads(body)["reply"]["id"]
            task = asyncio.create_task(self.http.stream(f"{messages}/{reply_id}/stream", opened))
            waiter = asyncio.create_task(opened.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if opened.is_set():
                self.opened += 1
                self._settle(all_settled)
            # A stream that outlives its reply by minutes is stuck: counted as an error.
            limit = self.args.ttft + self.args.ttft_jitter + self.args.words * self.args.word_delay + 300
            status, body = await asyncio.wait_for(task, limit)
            text, done = streamed_text(body)
            if status != 200 or done != "complete" or text != self.expected:
                raise RuntimeError(f"stream {status} {done}: {text[:80]!r}")
            self.completed += 1
        except Exception as error:  # noqa: BLE001 - every failure is counted and shown
            self.errors.append(f"{type(error).__name__}: {error}")
            if not opened.is_set():
                self._settle(all_settled)  # the hold begins once every stream is open or failed

    def _settle(self, all_settled: asyncio.Event) -> None:
        self.settled += 1
        if self.settled == self.args.streams:
            all_settled.set()

    async def plain_gets(self, done: asyncio.Event) -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                status, body = await self.http.call("GET", "/api/v1/conversations?limit=20")
                if status != 200:
                    self.errors.append(f"plain GET {status}: {body[:200]!r}")
            except Exception as error:  # noqa: BLE001
                self.errors.append(f"plain GET {type(error).__name__}: {error}")
            self.latencies[self.phase].append(time.monotonic() - started)
            await asyncio.sleep(self.args.get_interval)

    async def main(self) -> None:
        done = asyncio.Event()
        gets = asyncio.create_task(self.plain_gets(done))
        await asyncio.sleep(3)  # idle latency, and the workers settle
        pids = self.server.worker_pids()
        self.rss_before = {pid: process_rss_kb(pid) for pid in pids}
        self.fds_before = {pid: fds(pid) for pid in pids}
        self.phase = "setup"
        self.latencies["setup"] = []
        all_open = asyncio.Event()
        slots = asyncio.Semaphore(self.args.concurrency)
        started = time.monotonic()
        streams = [asyncio.create_task(self.one_stream(slots, all_open)) for _ in range(self.args.streams)]
        await all_open.wait()
        self.setup_seconds = time.monotonic() - started
        self.phase = "hold"
        await asyncio.sleep(2)
        self.rss_with = {pid: process_rss_kb(pid) for pid in pids}
        self.fds_with = {pid: fds(pid) for pid in pids}
        # The hold lasts until the model's first words (the earliest reply's ttft).
        hold_until = started + self.args.ttft
        await asyncio.sleep(max(0.0, hold_until - time.monotonic()))
        self.phase = "streaming"
        await asyncio.gather(*streams)
        done.set()
        await gets


def run(args, backend: str, directory: Path) -> dict:
    with Database(backend, directory) as database:
        uri = database.uri
        bouncer = None
        if args.pgbouncer:
            bouncer = pgbouncer.PgBouncer(bench_postgres_url(), pool_size=args.pgbouncer_pool, max_client_conn=4000)
            bouncer.start()
            on_exit(bouncer.stop)
            uri = bouncer.url_for(uri)
        model, model_url = start_model(args)
        # A stream served by the other worker than its reply's would poll the database 5 times
        # a second; with Redis notices it waits for the writer's notice instead.
        redis_server = RedisServer()
        redis_server.start()
        on_exit(redis_server.stop)
        env = {
            "CHATAPP_WORKER_CLASS": "gevent",
            "CHATAPP_WORKER_CONNECTIONS": str(args.worker_connections),
            "CHATAPP_MAX_REQUESTS": "0",
            "CHATAPP_BOT_ENGINE": "openai",
            "CHATAPP_OPENAI_BASE_URL": model_url,
            "CHATAPP_OPENAI_READ_TIMEOUT": str(args.ttft + args.ttft_jitter + 30),
            "CHATAPP_TITLES_ENABLED": "false",
            "CHATAPP_STREAM_RECHECK_SECONDS": str(args.recheck),
            "CHATAPP_REPLY_EVENTS": redis_server.url,
            "CHATAPP_REPLY_WORKERS": str(args.streams),
            "CHATAPP_REPLY_QUEUE_MAX": str(args.streams),
            "CHATAPP_SQLALCHEMY_ENGINE_OPTIONS": json.dumps(
                {
                    "pool_size": args.pool_size,
                    "max_overflow": 0,
                    "pool_timeout": args.pool_timeout,
                    "pool_pre_ping": True,
                }
            ),
        }
        if bouncer is not None:
            env["CHATAPP_DATABASE_POOLER"] = "pgbouncer"
        server = Server("wsgi:app", uri, directory, name="gevent", workers=args.workers, env=env)
        with server:
            import requests

            credentials = {"username": "streamer", "password": PASSWORD}
            requests.post(server.url + "/api/v1/users", json=credentials, timeout=30).raise_for_status()
            token = requests.post(server.url + "/api/v1/tokens", json=credentials, timeout=30).json()["token"]
            load = Run(args, server, token)
            with MetricsSampler(server.url, interval=0.5) as sampler:
                began = time.monotonic()
                asyncio.run(load.main())
                elapsed = time.monotonic() - began
            log = server.log_text()
        model.stdin.close()  # type: ignore[union-attr]
        model.wait(10)
        if bouncer is not None:
            bouncer.stop()
        redis_server.stop()
    streams = args.streams
    grew_kb = sum(load.rss_with.values()) - sum(load.rss_before.values())
    fds_grew = sum(load.fds_with.values()) - sum(load.fds_before.values())
    return {
        "backend": backend,
        "pgbouncer": args.pgbouncer,
        "streams": streams,
        "opened": load.opened,
        "completed": load.completed,
        "errors": len(load.errors),
        "error_samples": load.errors[:5],
        "setup_seconds": load.setup_seconds,
        "elapsed_seconds": elapsed,
        "latency_ms": {
            phase: {
                "n": len(values),
                "p50": percentile(values, 50) * 1000,
                "p95": percentile(values, 95) * 1000,
                "max": max(values, default=float("nan")) * 1000,
            }
            for phase, values in load.latencies.items()
        },
        "max_checked_out_by_worker": sampler.max_by_pid,
        "rss_kb_before": load.rss_before,
        "rss_kb_with": load.rss_with,
        "kb_per_stream": grew_kb / streams,
        "fds_before": load.fds_before,
        "fds_with": load.fds_with,
        "fds_per_stream": fds_grew / streams,
        "tracebacks": log.count("Traceback"),
    }


def report(result: dict, args) -> None:
    lat = result["latency_ms"]
    print(
        f"\n# {result['streams']} streams on {args.workers} gevent workers "
        f"({'PgBouncer' if result['pgbouncer'] else 'direct'}), pool_size {args.pool_size}, "
        f"pool_timeout {args.pool_timeout} s, "
        f"worker_connections {args.worker_connections}, model ttft {args.ttft}+{args.ttft_jitter} s, "
        f"{args.words} words x {args.word_delay} s, STREAM_RECHECK_SECONDS {args.recheck}"
    )
    print(
        f"streams opened {result['opened']}, completed with the right text {result['completed']}, "
        f"errors {result['errors']} (setup {fmt(result['setup_seconds'])} s, whole run {fmt(result['elapsed_seconds'])} s)"
    )
    for sample in result["error_samples"]:
        print(f"  error: {sample}")
    rows = [[phase, v["n"], fmt(v["p50"]), fmt(v["p95"]), fmt(v["max"])] for phase, v in lat.items()]
    print(table(["plain GET during", "n", "p50 ms", "p95 ms", "max ms"], rows))
    rows = [
        [
            pid,
            result["rss_kb_before"].get(pid, 0) // 1024,
            result["rss_kb_with"].get(pid, 0) // 1024,
            result["fds_before"].get(pid, 0),
            result["fds_with"].get(pid, 0),
            fmt(result["max_checked_out_by_worker"].get(str(pid), float("nan")), 0),
        ]
        for pid in result["rss_kb_before"]
    ]
    print(
        table(["worker", "RSS MiB before", "RSS MiB with streams", "fds before", "fds with", "max checked out"], rows)
    )
    print(
        f"memory per open stream (with its in-process reply): {fmt(result['kb_per_stream'])} KiB; "
        f"fds per open stream: {fmt(result['fds_per_stream'], 2)}; "
        f"tracebacks in the log: {result['tracebacks']}"
    )
    most = max(result["fds_with"].values(), default=0)
    print(f"most fds in one worker: {most} (ulimit -n must exceed it, with room for more streams landing there)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-model", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-connections", type=int, default=2000)
    parser.add_argument("--pool-size", type=int, default=50)
    parser.add_argument("--pool-timeout", type=float, default=5.0, help="as shipped: 5 s")
    parser.add_argument("--pgbouncer-pool", type=int, default=40)
    parser.add_argument("--no-pgbouncer", dest="pgbouncer", action="store_false")
    parser.add_argument("--concurrency", type=int, default=8, help="posts in flight while opening")
    parser.add_argument("--get-interval", type=float, default=0.1)
    parser.add_argument("--recheck", type=float, default=30.0, help="STREAM_RECHECK_SECONDS")
    parser.add_argument("--ttft", type=float, default=240.0)
    parser.add_argument("--ttft-jitter", type=float, default=30.0)
    parser.add_argument("--words", type=int, default=10)
    parser.add_argument("--word-delay", type=float, default=1.0)
    parser.add_argument("--json")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if args.serve_model:
        serve_model(args)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the client's sockets; gunicorn inherits it
    print(machine_report())
    print(f"# ulimit -n: {soft} raised to {hard} for the load generator and the servers it starts")
    results = []
    with workdir(args.keep_logs) as directory:
        for backend in backends(["postgresql"]):
            result = run(args, backend, directory)
            report(result, args)
            results.append(result)
    finish(args.json, results)


if __name__ == "__main__":
    main()
