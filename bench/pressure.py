"""The pressure scenario (tests/support/pressure.py's run_pressure) as figures: a slow bot
must not starve a small pool.

40 chats post at once, each then reads its reply's SSE stream to the end, while two
threads loop GET /api/v1/conversations and time it. The echo bot takes 3 s per reply.
/metrics is sampled every 0.2 s for the per-worker pool gauge
(chatapp_db_pool_checked_out). Configurations:

  small-pool       --workers 2 --threads 8, pool_size=2, max_overflow=0, pool_timeout=2
  shipped-threads  gunicorn.conf.py's workers and threads, the same small pool
  all-shipped      gunicorn.conf.py and chatapp's shipped pool settings

Targets: no errors, 40/40 replies complete, all 40 within 2x the delay, GET p95 under
250 ms, never more than pool_size connections checked out in a worker, no pool timeout.

    python bench/pressure.py [--backend sqlite postgresql] [--chats 40] [--delay 3] [--configs ...]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import Server  # noqa: E402
from bench.databases import Database, backends  # noqa: E402
from bench.lifecycle import workdir  # noqa: E402
from bench.metrics import MetricsSampler, PgSampler, checked_out_by_pid, format_holds, hold_summary  # noqa: E402
from bench.report import finish, fmt, loadavg, machine_report, print_verdicts, table  # noqa: E402
from tests.support.metrics import scrape  # noqa: E402
from tests.support.pressure import run_pressure  # noqa: E402

SMALL_POOL = {
    "CHATAPP_SQLALCHEMY_ENGINE_OPTIONS__pool_size": 2,
    "CHATAPP_SQLALCHEMY_ENGINE_OPTIONS__max_overflow": 0,
    "CHATAPP_SQLALCHEMY_ENGINE_OPTIONS__pool_timeout": 2,
}
# Earlier runs' command lines (bench/RESULTS.md) named small-pool "issue-3".
FORMER_NAMES = {"issue-3": "small-pool"}
CONFIGS = {
    # Sixteen threads over a 2-connection pool per worker: a request or reply that held a
    # connection while the bot thinks would make the others wait and get 503s.
    "small-pool": {"workers": 2, "threads": 8, "env": SMALL_POOL, "pool_limit": 2},
    "shipped-threads": {"workers": None, "threads": None, "env": SMALL_POOL, "pool_limit": 2},
    "all-shipped": {"workers": None, "threads": None, "env": {}, "pool_limit": 15},
}


def run_config(name: str, backend: str, args, wd: Path) -> dict:
    config = CONFIGS[name]
    with Database(backend, wd) as database:
        server = Server(
            "wsgi:app",
            database.uri,
            wd,
            name=f"pressure-{name}-{backend}",
            workers=config["workers"],
            threads=config["threads"],
            env={**config["env"], "CHATAPP_BOT_ECHO_DELAY": args.delay},
        )
        server.start()
        try:
            with MetricsSampler(server.url, interval=0.2) as sampler, PgSampler(database) as pg:
                figures = run_pressure(server.url, chats=args.chats, username=f"pressure-{backend}")
            time.sleep(1.5)
            after = scrape(server.url)
            log = server.log_text()
            idle_tx = sum(v for k, v in database.pg_states().items() if k.startswith("idle in transaction"))
        finally:
            server.stop()
    errors = figures["errors"]
    return {
        "config": name,
        "backend": backend,
        "workers": config["workers"] or "conf",
        "threads": config["threads"] or "conf",
        "pool_limit": config["pool_limit"],
        "errors": errors,
        "complete": figures["complete"],
        "chats": args.chats,
        "wall": figures["wall_seconds"],
        "reply_max": figures["reply_seconds_max"],
        "reply_median": figures["reply_seconds_median"],
        "get_count": figures["get_count"],
        "get_p50": figures["get_p50_ms"],
        "get_p95": figures["get_p95_ms"],
        "max_checked_out": sampler.max_by_pid,
        "metrics_samples": sampler.samples,
        "busy_503": sum("database_busy" in e for e in errors),
        "pool_timeouts_logged": len(re.findall(r"database pool exhausted|database unavailable \(TimeoutError\)", log)),
        "checked_out_after": checked_out_by_pid(after),
        "holds": hold_summary(after),
        "pg_idle_tx_max": sum(v for k, v in pg.max_by_state.items() if k.startswith("idle in transaction")),
        "pg_idle_tx_after": idle_tx,
        "pg_max_total": pg.max_total,
        "tracebacks": log.count("Traceback"),
        "loadavg": loadavg(),
        # Streams that held a worker thread for over half the bot time (gunicorn's access
        # log: duration_ms is from the thread taking the request to the last byte).
        "long_streams": sum(
            int(ms) > 500 * args.delay for ms in re.findall(r"/stream HTTP[^\n]*duration_ms=(\d+)", log)
        ),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *FORMER_NAMES])
    parser.add_argument("--chats", type=int, default=40)
    parser.add_argument("--delay", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=1, help="run each configuration this many times")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    args.configs = [FORMER_NAMES.get(name, name) for name in args.configs]
    print(machine_report())
    print(f"# pressure: {args.chats} chats, {args.delay:g} s bot, configs {args.configs}", flush=True)
    results, rows, verdicts = [], [], []
    with workdir(args.keep_logs) as wd:
        for backend in backends(args.backend):
            for name in args.configs:
                for _ in range(args.repeat):
                    r = run_config(name, backend, args, wd)
                    results.append(r)
                    print(
                        f"# {backend} {name}: {r['complete']}/{r['chats']} in {r['wall']:.2f} s, GET p95 "
                        f"{r['get_p95']:.0f} ms, long streams {r['long_streams']}, errors {len(r['errors'])}, "
                        f"load {r['loadavg']}",
                        flush=True,
                    )
    for r in results:
        max_out = max(r["max_checked_out"].values(), default=None)
        rows.append(
            [
                r["backend"],
                r["config"],
                f"{r['workers']}x{r['threads']}",
                len(r["errors"]),
                f"{r['complete']}/{r['chats']}",
                fmt(r["wall"], 2),
                fmt(r["reply_median"], 2),
                fmt(r["get_p50"], 0),
                fmt(r["get_p95"], 0),
                r["get_count"],
                r["long_streams"],
                f"{fmt(max_out, 0) if max_out is not None else '-'} ({r['metrics_samples']} samples)",
                r["busy_503"],
                r["pool_timeouts_logged"],
                fmt(sum(r["checked_out_after"].values()), 0) if r["checked_out_after"] else "-",
                f"{r['pg_idle_tx_max']}/{r['pg_max_total']}" if r["backend"] == "postgresql" else "-",
            ]
        )
        checks = {
            "errors": not r["errors"],
            "complete": r["complete"] == r["chats"],
            f"all within {2 * args.delay:g} s": r["wall"] <= 2 * args.delay,
            "GET p95 < 250 ms": r["get_p95"] < 250,
            f"checked out <= {r['pool_limit']}": max_out is not None and max_out <= r["pool_limit"],
            "no pool timeouts": r["busy_503"] == 0 and r["pool_timeouts_logged"] == 0,
        }
        missed = [k for k, ok in checks.items() if not ok]
        verdicts.append(
            f"{r['backend']} {r['config']}: "
            + ("all targets met" if not missed else "MISSED: " + ", ".join(missed))
            + (f"; errors: {r['errors'][:3]}" if r["errors"] else "")
        )
    print()
    print(
        table(
            [
                "db",
                "config",
                "workers x threads",
                "errors",
                "replies",
                "all replies s",
                "reply median s",
                "GET p50 ms",
                "GET p95 ms",
                "GETs",
                "long streams",
                "max checked out/worker",
                "503 busy",
                "pool timeouts (log)",
                "checked out after",
                "PG idle-in-tx/total (max)",
            ],
            rows,
        )
    )
    print_verdicts(verdicts)
    print()
    print("Connection hold times by holder (chatapp_db_connection_hold_seconds, all workers):")
    for r in results:
        print(f"- {r['backend']} {r['config']}: {format_holds(r['holds']) or 'no /metrics'}")
    finish(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
