"""Benchmark 2: replies per second with a slow bot and many concurrent chats.

Each chat is a closed loop on its own conversation: post a message, wait for the whole
reply, post again. chatapp answers 202 and the client reads the reply's SSE stream to
its ``done`` event; the textbook app (bench/textbook_app.py) answers when the reply is
written. Both run chatapp's EchoBot with the same delay, under the same gunicorn
(gunicorn.conf.py: the shipped workers and threads) and the default pool (chatapp's
shipped SQLALCHEMY_ENGINE_OPTIONS; SQLAlchemy's defaults for the textbook app).

Ceiling (Little's law): at most one reply per worker thread per bot time, so
workers * threads / delay replies/s. Replies are counted when they complete inside the
measuring window (after a warm-up of delay + 2 s).

Apps:
  textbook        bench/textbook_app.py
  chatapp         wsgi:app, shipped settings
  NAME            --variant NAME:KEY=VALUE,KEY=VALUE: chatapp with CHATAPP_KEY=VALUE set,
                  e.g. --variant slowpoll:STREAM_POLL_INTERVAL=0.5,REPLY_FLUSH_INTERVAL=0.5

    python bench/slow_bot.py [--backend sqlite postgresql] [--delays 0.5 3] [--chats 128]
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.apps import Server, connections_by_worker  # noqa: E402
from bench.databases import Database, backends, seed  # noqa: E402
from bench.lifecycle import ROOT, workdir  # noqa: E402
from bench.metrics import MetricsSampler, PgSampler, checked_out_by_pid, format_holds, hold_summary  # noqa: E402
from bench.report import finish, fmt, loadavg, machine_report, print_verdicts, table  # noqa: E402
from tests.support.load import percentile  # noqa: E402
from tests.support.metrics import scrape  # noqa: E402
from tests.support.sse import read_reply  # noqa: E402

CONTENT = "the quick brown fox jumps over the lazy dog"
SHIPPED_WORKERS, SHIPPED_THREADS = 2, 32  # gunicorn.conf.py defaults (read below when possible)


def shipped_gunicorn() -> tuple[int, int]:
    text = (ROOT / "gunicorn.conf.py").read_text()
    workers = re.search(r'CHATAPP_WORKERS", "(\d+)"', text)
    threads = re.search(r'CHATAPP_THREADS", "(\d+)"', text)
    return (
        int(workers.group(1)) if workers else SHIPPED_WORKERS,
        int(threads.group(1)) if threads else SHIPPED_THREADS,
    )


def error_code(response: requests.Response) -> str:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return ""


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.done: list[tuple[float, float]] = []  # (finished at, seconds from post to last byte)
        self.errors: dict[str, int] = {}
        self.busy = 0  # 503 database_busy: a pool timeout answered as such

    def error(self, what: str) -> None:
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1


def chat_loop(kind: str, base: str, token: str, conversation_id: int, until: float, tally: Tally) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    url = f"{base}/api/v1/conversations/{conversation_id}/messages"
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            response = session.post(url, json={"content": CONTENT}, timeout=(10, 180))
            if kind == "textbook":
                ok = response.status_code == 201 and response.json()["reply"]["content"] == CONTENT
                if not ok:
                    tally.error(f"POST {response.status_code}")
            else:
                if response.status_code != 202:
                    code = error_code(response)
                    if code == "database_busy":
                        with tally.lock:
                            tally.busy += 1
                    tally.error(f"POST {response.status_code} {code}".strip())
                    time.sleep(0.2)
                    continue
                reply_id = response.json()["reply"]["id"]
                reply = read_reply(session, f"{url}/{reply_id}/stream")
                ok = reply.status == "complete" and reply.text == CONTENT
                if not ok:
                    tally.error(f"stream http={reply.http_status} status={reply.status}")
        except requests.RequestException as exc:
            tally.error(type(exc).__name__)
            time.sleep(0.2)
            continue
        if ok:
            finished = time.monotonic()
            with tally.lock:
                tally.done.append((finished, finished - started))


def run_one(
    kind: str,
    module: str,
    backend: str,
    database: Database,
    conversations: list[int],
    token: str,
    delay: float,
    args,
    wd: Path,
    env: dict,
) -> dict:
    workers, threads = args.workers, args.threads
    server = Server(
        module,
        database.uri,
        wd,
        name=f"{kind.replace(' ', '_')}-{backend}-{delay:g}",
        workers=args.workers_arg,
        threads=args.threads_arg,
        env={"CHATAPP_BOT_ECHO_DELAY": delay, "CHATAPP_MAX_REQUESTS": 0, **env},
    )
    server.start()
    try:
        warmup = delay + 2.0
        window = max(args.window, 4 * delay)
        t0 = time.monotonic()
        until = t0 + warmup + window
        tally = Tally()
        before = resource.getrusage(resource.RUSAGE_SELF)
        cpu_before = server.cpu_seconds()
        with MetricsSampler(server.url, interval=0.5) as sampler, PgSampler(database) as pg:
            chats = [
                threading.Thread(target=chat_loop, args=(kind, server.url, token, cid, until, tally), daemon=True)
                for cid in conversations
            ]
            for thread in chats:
                thread.start()
            time.sleep(max(0.0, t0 + warmup + window / 2 - time.monotonic()))
            spread = connections_by_worker(server)
            for thread in chats:
                thread.join(max(1.0, until + 200 - time.monotonic()))
            stuck = sum(thread.is_alive() for thread in chats)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        server_cpu = server.cpu_seconds() - cpu_before
        counted = [seconds for finished, seconds in tally.done if t0 + warmup <= finished <= until]
        time.sleep(1.0)
        after_samples = scrape(server.url)
        checked_out = checked_out_by_pid(after_samples)
        holds = hold_summary(after_samples)
        log = server.log_text()
    finally:
        server.stop()
    ceiling = workers * threads / delay
    rate = len(counted) / window
    return {
        "app": kind,
        "backend": backend,
        "delay": delay,
        "chats": len(conversations),
        "replies": len(counted),
        "window": window,
        "rate": rate,
        "ceiling": ceiling,
        "reply_p50": percentile(counted, 50),
        "reply_p95": percentile(counted, 95),
        "errors": tally.errors,
        "busy_503": tally.busy,
        "stuck_clients": stuck,
        # Pool timeouts as the servers log them: chatapp's 503 handler, chatapp's reply
        # writer retrying, and SQLAlchemy's own message (the textbook app's 500s).
        "pool_timeouts_logged": len(
            re.findall(
                r"database pool exhausted|QueuePool limit of size|"
                r"database unavailable \(TimeoutError\)",
                log,
            )
        ),
        "tracebacks": log.count("Traceback"),
        "max_checked_out_by_pid": sampler.max_by_pid,
        "metrics_samples": sampler.samples,
        "checked_out_after": checked_out,
        "holds": holds,
        "clients_per_worker": sorted(spread.values()),
        "pg_max_by_state": pg.max_by_state,
        "pg_max_total": pg.max_total,
        "client_cpu_pct": 100 * ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / wall,
        "server_cpu_pct": 100 * server_cpu / wall,
        "loadavg": loadavg(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--delays", nargs="+", type=float, default=[0.5, 3.0], help="bot seconds per reply")
    parser.add_argument("--chats", type=int, default=None, help="concurrent chats (default: 2 x workers x threads)")
    parser.add_argument("--window", type=float, default=10.0, help="measuring seconds (at least 4 x delay)")
    parser.add_argument("--workers", dest="workers_arg", type=int, default=None)
    parser.add_argument("--threads", dest="threads_arg", type=int, default=None)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="also run chatapp with these CHATAPP_* settings (repeatable)",
    )
    parser.add_argument("--apps", nargs="+", default=None, help="run only these apps (textbook, chatapp, variants)")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    shipped_workers, shipped_threads = shipped_gunicorn()
    args.workers = args.workers_arg or shipped_workers
    args.threads = args.threads_arg or shipped_threads
    chats = args.chats or 2 * args.workers * args.threads

    apps = [("textbook", "bench.textbook_app:app", {}), ("chatapp", "wsgi:app", {})]
    for variant in args.variant:
        name, _, settings = variant.partition(":")
        env = dict(f"CHATAPP_{item}".split("=", 1) for item in settings.split(",") if item)
        apps.append((f"chatapp {name}", "wsgi:app", env))
    if args.apps:
        apps = [app for app in apps if app[0] in args.apps or app[0].removeprefix("chatapp ") in args.apps]
    from chatapp.config import Defaults

    print(machine_report())
    print(
        f"# slow bot: {chats} concurrent chats, gunicorn {args.workers} workers x {args.threads} threads, "
        f"delays {args.delays}, window >= {args.window:g} s; chatapp shipped REPLY_WORKERS="
        f"{Defaults.REPLY_WORKERS}, STREAM_POLL_INTERVAL={Defaults.STREAM_POLL_INTERVAL}, "
        f"REPLY_FLUSH_INTERVAL={Defaults.REPLY_FLUSH_INTERVAL}, pool {Defaults.SQLALCHEMY_ENGINE_OPTIONS}; "
        f"variants {[(name, env) for name, _, env in apps[2:]]}",
        flush=True,
    )
    results = []
    with workdir(args.keep_logs) as wd:
        for backend in backends(args.backend):
            with Database(backend, wd) as database:
                # Fresh conversations for every run: one reply at a time per conversation.
                runs = len(apps) * len(args.delays)
                seeded = seed(database.uri, conversations=chats * runs)
                ids = iter(range(runs))
                for delay in args.delays:
                    for kind, module, env in apps:
                        start = next(ids) * chats
                        result = run_one(
                            kind,
                            module,
                            backend,
                            database,
                            seeded.conversation_ids[start : start + chats],
                            seeded.token,
                            delay,
                            args,
                            wd,
                            env,
                        )
                        results.append(result)
                        print(
                            f"# {backend} delay {delay:g} {kind}: {result['rate']:.1f} replies/s "
                            f"(ceiling {result['ceiling']:.1f}), errors {result['errors']}, "
                            f"server CPU {result['server_cpu_pct']:.0f}%, client CPU "
                            f"{result['client_cpu_pct']:.0f}%, load {result['loadavg']}",
                            flush=True,
                        )

    rows, verdicts = [], []
    for r in results:
        textbook = next(
            (
                x
                for x in results
                if x["backend"] == r["backend"] and x["delay"] == r["delay"] and x["app"] == "textbook"
            ),
            None,
        )
        vs_textbook = r["rate"] / textbook["rate"] if textbook and textbook["rate"] else float("nan")
        pg = r["pg_max_by_state"]
        rows.append(
            [
                r["backend"],
                fmt(r["delay"], 1),
                r["app"],
                r["replies"],
                fmt(r["rate"]),
                fmt(r["ceiling"]),
                f"{r['rate'] / r['ceiling']:.2f}x",
                f"{vs_textbook:.2f}x",
                fmt(r["reply_p50"], 2),
                fmt(r["reply_p95"], 2),
                sum(r["errors"].values()),
                r["busy_503"],
                r["pool_timeouts_logged"],
                max(r["max_checked_out_by_pid"].values(), default="-"),
                f"{pg.get('idle in transaction', 0)}/{r['pg_max_total']}" if r["backend"] == "postgresql" else "-",
                "/".join(map(str, r["clients_per_worker"])) or "-",
                fmt(r["server_cpu_pct"], 0) + "%",
                fmt(r["client_cpu_pct"], 0) + "%",
            ]
        )
        if r["app"].startswith("chatapp"):
            ok_ceiling = r["rate"] >= 0.9 * r["ceiling"]
            ok_textbook = vs_textbook >= 2.0
            ok_timeouts = r["busy_503"] == 0 and r["pool_timeouts_logged"] == 0
            verdicts.append(
                f"{r['backend']} {r['delay']:g} s {r['app']}: {r['rate'] / r['ceiling']:.2f}x ceiling "
                f"({'met' if ok_ceiling else 'MISSED'} >= 0.9x), {vs_textbook:.2f}x textbook "
                f"({'met' if ok_textbook else 'MISSED'} >= 2x), pool timeouts "
                f"{r['busy_503'] + r['pool_timeouts_logged']} ({'met' if ok_timeouts else 'MISSED'}); "
                f"checked out after: {r['checked_out_after'] or '-'}"
            )
    print()
    print(
        table(
            [
                "db",
                "bot s",
                "app",
                "replies",
                "replies/s",
                "ceiling",
                "vs ceiling",
                "vs textbook",
                "reply p50 s",
                "reply p95 s",
                "errors",
                "503 busy",
                "pool timeouts (log)",
                "max checked out/worker",
                "PG idle-in-tx/total (max)",
                "clients per worker",
                "server CPU",
                "client CPU",
            ],
            rows,
        )
    )
    print_verdicts(verdicts)
    print()
    print("chatapp connection hold times by holder (chatapp_db_connection_hold_seconds, all workers):")
    for r in results:
        if r["holds"]:
            print(f"- {r['backend']} {r['delay']:g} s {r['app']}: {format_holds(r['holds'])}")
    finish(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
