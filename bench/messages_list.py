"""Benchmark 1: GET /api/v1/conversations/<id>/messages requests/s, side by side.

Four apps on the same database, each under the same gunicorn (gunicorn.conf.py, the
shipped workers and threads unless --workers/--threads), loaded by the same wrk:

  ceiling   bench/ceiling_app.py: bare Flask, the same statements through the raw driver
  core_floor bench/core_floor_app.py: bare Flask, the same statements through SQLAlchemy Core
  textbook  bench/textbook_app.py: a textbook Flask-SQLAlchemy app
  chatapp   wsgi:app with its shipped configuration

Rounds are interleaved (ceiling, core_floor, textbook, chatapp, then rotated), because the machine is
shared and its background load drifts; the table gives the median of the rounds.

    python bench/messages_list.py [--backend sqlite postgresql] [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.apps import Server  # noqa: E402
from bench.databases import Database, backends, seed  # noqa: E402
from bench.lifecycle import workdir  # noqa: E402
from bench.load import load  # noqa: E402
from bench.metrics import checked_out_by_pid  # noqa: E402
from bench.report import finish, fmt, loadavg, machine_report, median, print_verdicts, table  # noqa: E402
from tests.support.metrics import scrape  # noqa: E402

APPS = [
    ("ceiling", "bench.ceiling_app:app"),
    ("core_floor", "bench.core_floor_app:app"),
    ("textbook", "bench.textbook_app:app"),
    ("chatapp", "wsgi:app"),
]
TARGET_VS_CEILING = 0.8


def run_backend(backend: str, args, wd: Path) -> dict:
    with Database(backend, wd) as database:
        seeded = seed(database.uri, conversations=2, messages=args.messages)
        conversation = seeded.conversation_ids[0]
        path = f"/api/v1/conversations/{conversation}/messages?limit={args.limit}"
        headers = {"Authorization": f"Bearer {seeded.token}"}
        # Recycling workers mid-run (max_requests) would time a restart, not the app.
        env = {"CHATAPP_MAX_REQUESTS": 0}
        servers = {}
        try:
            for name, module in APPS:
                servers[name] = Server(
                    module,
                    database.uri,
                    wd,
                    name=f"{name}-{backend}",
                    workers=args.workers,
                    threads=args.threads,
                    env=env,
                ).start()
            # Same answer from every app: same ids, same content.
            answers = {}
            for name, server in servers.items():
                response = requests.get(server.url + path, headers=headers, timeout=10)
                response.raise_for_status()
                answers[name] = [(m["id"], m["content"], m["status"]) for m in response.json()["items"]]
            if len({tuple(a) for a in answers.values()}) != 1 or len(answers["chatapp"]) != args.limit:
                raise RuntimeError(f"the apps disagree on the page: {answers}")
            for server in servers.values():  # warm every worker thread's connection and caches
                load(server.url + path, headers=headers, seconds=2, connections=args.connections, tool=args.tool)
            rounds: dict[str, list] = {name: [] for name in servers}
            order = list(servers)
            for round_no in range(args.rounds):
                for name in order[round_no % len(order) :] + order[: round_no % len(order)]:
                    server = servers[name]
                    cpu_before = server.cpu_seconds()
                    result = load(
                        server.url + path,
                        headers=headers,
                        seconds=args.seconds,
                        connections=args.connections,
                        tool=args.tool,
                    )
                    result.server_cpu_seconds = server.cpu_seconds() - cpu_before
                    result.extra["loadavg"] = loadavg()
                    rounds[name].append(result)
                    print(
                        f"# {backend} round {round_no + 1} {name}: {result.rps:,.0f} req/s "
                        f"(server CPU {result.server_cpu_pct:.0f}%, load generator CPU "
                        f"{result.loader_cpu_pct:.0f}%, load {result.extra['loadavg']})",
                        flush=True,
                    )
                    time.sleep(0.5)
            leaks = checked_out_by_pid(scrape(servers["chatapp"].url))
        finally:
            for server in servers.values():
                server.stop()
        return {"rounds": rounds, "chatapp_checked_out_after": leaks, "pg": database.pg_states()}


def summarize(backend: str, data: dict, rows: list, verdicts: list) -> None:
    rounds = data["rounds"]
    rps = {name: median([r.rps for r in results]) for name, results in rounds.items()}
    for name, results in rounds.items():
        ratio = rps[name] / rps["ceiling"]
        rows.append(
            [
                backend,
                name,
                fmt(rps[name], 0),
                " / ".join(fmt(r.rps, 0) for r in results),
                f"{ratio:.2f}x",
                f"{rps[name] / rps['textbook']:.2f}x",
                fmt(median([r.p50_ms for r in results])),
                fmt(median([r.p99_ms for r in results])),
                sum(r.non_2xx + r.socket_errors for r in results),
                fmt(median([r.server_cpu_pct for r in results]), 0) + "%",
                fmt(median([r.loader_cpu_pct for r in results]), 0) + "%",
            ]
        )
    chat = rps["chatapp"]
    verdicts.append(
        f"{backend}: chatapp {chat / rps['ceiling']:.2f}x the ceiling (target >= {TARGET_VS_CEILING}x: "
        f"{'met' if chat >= TARGET_VS_CEILING * rps['ceiling'] else 'MISSED'}), "
        f"{chat / rps['textbook']:.2f}x the textbook app (target >= 1.0x: "
        f"{'met' if chat >= rps['textbook'] else 'MISSED'}); connections checked out after: "
        f"{data['chatapp_checked_out_after'] or 'no /metrics'}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--seconds", type=float, default=8, help="length of each measured run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per app (median reported)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent keep-alive connections")
    parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: gunicorn.conf.py)")
    parser.add_argument("--threads", type=int, default=None, help="gunicorn threads (default: gunicorn.conf.py)")
    parser.add_argument("--messages", type=int, default=50, help="messages in the conversation")
    parser.add_argument("--limit", type=int, default=20, help="page size requested")
    parser.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)

    print(machine_report())
    print(
        f"# messages list: {args.rounds} rounds x {args.seconds:g} s per app, {args.connections} connections, "
        f"page of {args.limit} from {args.messages} messages, gunicorn workers={args.workers or 'conf'} "
        f"threads={args.threads or 'conf'}",
        flush=True,
    )
    rows, verdicts, raw = [], [], {}
    with workdir(args.keep_logs) as wd:
        for backend in backends(args.backend):
            data = run_backend(backend, args, wd)
            raw[backend] = {name: [r.__dict__ for r in results] for name, results in data["rounds"].items()}
            summarize(backend, data, rows, verdicts)
    print()
    print(
        table(
            [
                "db",
                "app",
                "req/s (median)",
                "rounds",
                "vs ceiling",
                "vs textbook",
                "p50 ms",
                "p99 ms",
                "errors",
                "server CPU",
                "wrk CPU",
            ],
            rows,
        )
    )
    print_verdicts(verdicts)
    finish(args.json, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
