"""Benchmark 3: 10,000 mixed requests; worker memory growth and what is left checked out.

chatapp under gunicorn (gunicorn.conf.py's workers and threads; max_requests off so that
no worker is recycled mid-run, which would hide growth) with the echo bot at 0 s. Client
threads send a weighted mix of API requests: lists, reads, renames, 404s and 401s,
message posts each followed by reading the reply's stream to its end, conversations
created and deleted, health probes, /metrics. The resident memory (RSS) of every worker
is sampled every 500 requests; the figure is the growth from request 1,000 (warm) to
request 10,000. At the end: the pool gauges from /metrics (connections checked out, per
worker) and, on PostgreSQL, pg_stat_activity for the benchmark database.

    python bench/memory.py [--backend sqlite postgresql] [--requests 10000] [--clients 8]
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.apps import Server  # noqa: E402
from bench.databases import Database, backends, seed  # noqa: E402
from bench.lifecycle import workdir  # noqa: E402
from bench.metrics import checked_out_by_pid  # noqa: E402
from bench.report import finish, fmt, loadavg, machine_report, print_verdicts, table  # noqa: E402
from tests.support.metrics import scrape  # noqa: E402
from tests.support.sse import read_reply  # noqa: E402

TARGET_GROWTH = 0.10
CONTENT = "the quick brown fox jumps over the lazy dog"


def rss_by_mapping(pid: int, top: int = 6) -> list[tuple[str, int]]:
    """Resident kB of a process by mapping (file path, [heap], or anonymous), largest first."""
    totals: dict[str, int] = {}
    name = "?"
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    parts = line.split()
                    name = parts[5] if len(parts) > 5 else "[anon]"
                elif first == "Rss:":
                    totals[name] = totals.get(name, 0) + int(line.split()[1])
    except OSError:
        return []
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


def process_threads(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Counter:
    def __init__(self, total: int, server: Server, sample_every: int = 500):
        self.lock = threading.Lock()
        self.count = 0
        self.total = total
        self.server = server
        self.sample_every = sample_every
        self.rss: list[tuple[int, dict[int, int]]] = []
        self.threads: list[tuple[int, int]] = []  # (request number, threads in all workers)
        self.statuses: dict[str, int] = {}
        self.unexpected: list[str] = []

    def take(self) -> int | None:
        """A request number, or None once all have been handed out."""
        with self.lock:
            if self.count >= self.total:
                return None
            self.count += 1
            number = self.count
        if number % self.sample_every == 0 or number == 1000:
            self.rss.append((number, self.server.rss_kb()))
            self.threads.append((number, sum(process_threads(pid) for pid in self.server.worker_pids())))
        return number

    def record(self, label: str, response: requests.Response, expected: tuple[int, ...]) -> None:
        key = f"{label} {response.status_code}"
        with self.lock:
            self.statuses[key] = self.statuses.get(key, 0) + 1
            if response.status_code not in expected and len(self.unexpected) < 20:
                self.unexpected.append(f"{key}: {response.text[:150]}")


def client_loop(index: int, base: str, token: str, own: list[int], shared: list[int], counter: Counter) -> None:
    rng = random.Random(index)
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"
    api = base + "/api/v1"

    def call(label, method, url, expected=(200,), **kwargs):
        if counter.take() is None:
            raise StopIteration
        response = http.request(method, url, timeout=60, **kwargs)
        counter.record(label, response, expected)
        return response

    actions = [
        (20, "list conversations"),
        (20, "list messages"),
        (10, "get conversation"),
        (18, "post + stream"),
        (5, "rename"),
        (5, "create + delete"),
        (6, "healthz"),
        (3, "readyz"),
        (6, "404"),
        (3, "401"),
        (2, "page 2"),
        (2, "metrics"),
    ]
    weights = [w for w, _ in actions]
    try:
        while True:
            action = rng.choices(actions, weights)[0][1]
            conversation = rng.choice(shared)
            if action == "list conversations":
                call(action, "GET", f"{api}/conversations", params={"limit": 20})
            elif action == "list messages":
                call(action, "GET", f"{api}/conversations/{conversation}/messages", params={"limit": 20})
            elif action == "page 2":
                first = call(action, "GET", f"{api}/conversations/{shared[0]}/messages", params={"limit": 10})
                cursor = first.json().get("next_cursor") if first.ok else None
                if cursor:
                    call(
                        action,
                        "GET",
                        f"{api}/conversations/{shared[0]}/messages",
                        params={"limit": 10, "cursor": cursor},
                    )
            elif action == "get conversation":
                call(action, "GET", f"{api}/conversations/{conversation}")
            elif action == "post + stream":
                mine = rng.choice(own)
                posted = call(
                    "post message",
                    "POST",
                    f"{api}/conversations/{mine}/messages",
                    json={"content": CONTENT},
                    expected=(202,),
                )
                if posted.status_code == 202:
                    if counter.take() is None:
                        raise StopIteration
                    reply = posted.json()["reply"]["id"]
                    stream = read_reply(http, f"{api}/conversations/{mine}/messages/{reply}/stream", timeout=(10, 60))
                    status = stream.status
                    key = f"stream {stream.http_status} {status}"
                    with counter.lock:
                        counter.statuses[key] = counter.statuses.get(key, 0) + 1
                        if status != "complete":
                            counter.unexpected.append(key)
            elif action == "rename":
                call(
                    action,
                    "PATCH",
                    f"{api}/conversations/{rng.choice(own)}",
                    json={"title": f"renamed {rng.random():.6f}"},
                )
            elif action == "create + delete":
                created = call(
                    "create conversation",
                    "POST",
                    f"{api}/conversations",
                    json={"title": "short-lived"},
                    expected=(201,),
                )
                if created.status_code == 201:
                    call(
                        "delete conversation", "DELETE", f"{api}/conversations/{created.json()['id']}", expected=(204,)
                    )
            elif action == "healthz":
                call(action, "GET", f"{base}/healthz")
            elif action == "readyz":
                call(action, "GET", f"{base}/readyz")
            elif action == "404":
                call(action, "GET", f"{api}/conversations/99999999", expected=(404,))
            elif action == "401":
                call(
                    action,
                    "GET",
                    f"{api}/conversations",
                    expected=(401,),
                    headers={"Authorization": "Bearer chat_not-a-real-token"},
                )
            elif action == "metrics":
                call(action, "GET", f"{base}/metrics", expected=(200, 404))
    except StopIteration:
        return


def run_backend(backend: str, args, wd: Path) -> dict:
    with Database(backend, wd) as database:
        seeded = seed(database.uri, conversations=args.clients * 3 + 20, messages=40)
        shared = seeded.conversation_ids[:20]
        server = Server(
            "wsgi:app",
            database.uri,
            wd,
            name=f"memory-{backend}",
            workers=args.workers,
            threads=args.threads,
            env={
                "CHATAPP_MAX_REQUESTS": 0,
                "CHATAPP_BOT_ECHO_DELAY": 0,
                **dict(f"CHATAPP_{item}".split("=", 1) for item in args.env),
            },
        ).start()
        try:
            pids_before = server.worker_pids()
            counter = Counter(args.requests, server)
            started = time.monotonic()
            clients = [
                threading.Thread(
                    target=client_loop,
                    daemon=True,
                    args=(
                        i,
                        server.url,
                        seeded.token,
                        seeded.conversation_ids[20 + 3 * i : 23 + 3 * i],
                        shared,
                        counter,
                    ),
                )
                for i in range(args.clients)
            ]
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join(600)
            seconds = time.monotonic() - started
            final_rss = server.rss_kb()
            mappings = {pid: rss_by_mapping(pid) for pid in server.worker_pids()}
            files = []
            if backend == "sqlite":
                base = Path(database.uri.split(":///", 1)[1])
                files = [
                    (path.name, path.stat().st_size)
                    for path in (base, Path(f"{base}-wal"), Path(f"{base}-shm"))
                    if path.exists()
                ]
            counter.rss.append((counter.count, final_rss))
            time.sleep(1.5)  # replies finishing, streams closing
            samples = scrape(server.url)
            checked_out = checked_out_by_pid(samples)
            pg = database.pg_states()
            pids_after = server.worker_pids()
            tracebacks = server.log_text().count("Traceback")
        finally:
            server.stop()
    at_1000 = next(rss for n, rss in counter.rss if n >= 1000)
    return {
        "backend": backend,
        "requests": counter.count,
        "seconds": seconds,
        "rss": counter.rss,
        "rss_1000": sum(at_1000.values()),
        "rss_end": sum(final_rss.values()),
        "per_worker": {pid: (at_1000.get(pid, 0), final_rss.get(pid, 0)) for pid in final_rss},
        "statuses": counter.statuses,
        "unexpected": counter.unexpected,
        "checked_out": checked_out,
        "pg": pg,
        "recycled": pids_before != pids_after,
        "tracebacks": tracebacks,
        "loadavg": loadavg(),
        "mappings": mappings,
        "sqlite_files": files,
        "threads": counter.threads,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra chatapp setting, CHATAPP_KEY=VALUE (repeatable)",
    )
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    print(machine_report())
    print(
        f"# memory: {args.requests} mixed requests from {args.clients} client threads; settings {args.env}", flush=True
    )
    results, rows, verdicts = [], [], []
    with workdir(args.keep_logs) as wd:
        for backend in backends(args.backend):
            r = run_backend(backend, args, wd)
            results.append(r)
            growth = (r["rss_end"] - r["rss_1000"]) / r["rss_1000"]
            per_worker = ", ".join(f"{a / 1024:.1f}->{b / 1024:.1f}" for a, b in r["per_worker"].values())
            idle_tx = sum(v for k, v in r["pg"].items() if k.startswith("idle in transaction"))
            rows.append(
                [
                    backend,
                    r["requests"],
                    fmt(r["requests"] / r["seconds"], 0),
                    fmt(r["rss_1000"] / 1024),
                    fmt(r["rss_end"] / 1024),
                    f"{growth * 100:+.1f}%",
                    per_worker,
                    len(r["unexpected"]),
                    fmt(sum(r["checked_out"].values()), 0) if r["checked_out"] else "no /metrics",
                    (f"{sum(r['pg'].values())} open, {idle_tx} idle in tx" if backend == "postgresql" else "-"),
                    "yes" if r["recycled"] else "no",
                    r["tracebacks"],
                ]
            )
            verdicts.append(
                f"{backend}: RSS growth 1,000 -> {r['requests']:,}: {growth * 100:+.1f}% "
                f"({'met' if growth < TARGET_GROWTH else 'MISSED'} < 10%); checked out at the end: "
                f"{r['checked_out'] or 'no /metrics'} "
                f"({'met' if r['checked_out'] and not any(r['checked_out'].values()) else 'CHECK'}); "
                f"unexpected answers: {r['unexpected'][:5] or 'none'}"
            )
            curve = "  ".join(f"{n}:{sum(rss.values()) / 1024:.1f}" for n, rss in r["rss"])
            print(f"# {backend} RSS (MiB, all workers) by request number: {curve}", flush=True)
            print(f"# {backend} answers: {dict(sorted(r['statuses'].items()))}", flush=True)
            print(
                f"# {backend} threads (all workers) by request number: "
                + "  ".join(f"{n}:{t}" for n, t in r["threads"]),
                flush=True,
            )
            for pid, mapping in r["mappings"].items():
                print(f"# {backend} worker {pid} resident kB by mapping at the end: {mapping}", flush=True)
            if r["sqlite_files"]:
                print(f"# {backend} database files at the end (bytes): {r['sqlite_files']}", flush=True)
    print()
    print(
        table(
            [
                "db",
                "requests",
                "req/s",
                "RSS MiB @1,000",
                "RSS MiB @end",
                "growth",
                "per worker MiB",
                "unexpected",
                "checked out at end",
                "PostgreSQL backends at end",
                "recycled",
                "tracebacks",
            ],
            rows,
        )
    )
    print_verdicts(verdicts)
    finish(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
