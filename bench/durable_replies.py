"""Durable replies: recovery after a worker's SIGKILL, and what leases cost.

Starts gunicorn (2 workers, the shipped lease settings) with a 3 s echo bot, posts
``--chats`` messages (one conversation each) so both workers generate replies, SIGKILLs
one worker, and measures, from the kill:
- until every conversation accepts messages again (no reply pending or streaming), and
- until the last orphaned reply has completed (all of them complete with their text);
then reads the lease keeper's statements from /metrics: renewals (writes) and stop
checks (reads) per reply. Nothing is asserted: it prints a table (and --json).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import requests
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import Server  # noqa: E402
from bench.databases import Database, backends  # noqa: E402
from bench.lifecycle import workdir  # noqa: E402
from bench.report import finish, fmt, machine_report, table  # noqa: E402
from tests.support.metrics import scrape  # noqa: E402

BOT_SECONDS = 3.0
WORDS = " ".join(f"w{n}" for n in range(24))


def replies_in_progress(uri: str) -> list[tuple]:
    engine = sa.create_engine(uri)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT id, status, attempt, content FROM messages WHERE role = 'assistant'")
            ).all()
    finally:
        engine.dispose()


def run(backend: str, chats: int, wd: Path) -> dict:
    with Database(backend, wd) as database:
        env = {
            "CHATAPP_BOT_ECHO_DELAY": BOT_SECONDS,
            "CHATAPP_RATELIMIT_ENABLED": "false",
            "CHATAPP_METRICS_PUBLIC": "true",
        }
        with Server("wsgi:app", database.uri, wd, name=f"durable-{backend}", workers=2, threads=16, env=env) as server:
            credentials = {"username": "bench", "password": "correct horse"}
            requests.post(server.url + "/api/v1/users", json=credentials, timeout=30)
            token = requests.post(server.url + "/api/v1/tokens", json=credentials, timeout=30).json()["token"]
            headers = {"Authorization": f"Bearer {token}", "Connection": "close"}
            for n in range(chats):
                conversation = requests.post(
                    server.url + "/api/v1/conversations", json={}, headers=headers, timeout=30
                ).json()
                requests.post(
                    f"{server.url}/api/v1/conversations/{conversation['id']}/messages",
                    json={"content": f"{n} {WORDS}"},
                    headers=headers,
                    timeout=30,
                )
            time.sleep(1.0)
            victim = server.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            accepting = complete = None
            while time.monotonic() - killed < 120:
                rows = replies_in_progress(database.uri)
                if accepting is None and all(status not in ("pending", "streaming") for _, status, _, _ in rows):
                    accepting = time.monotonic() - killed
                if all(status == "complete" for _, status, _, _ in rows):
                    complete = time.monotonic() - killed
                    break
                time.sleep(0.1)
            rows = replies_in_progress(database.uri)
            orphans = sum(1 for _, _, attempt, _ in rows if attempt > 0)
            whole = sum(
                1 for _, status, _, content in rows if status == "complete" and content.split(" ", 1)[1] == WORDS
            )
            samples = scrape(server.url) or []
    statements = {
        labels.get("kind"): value for name, labels, value in samples if name == "chatapp_reply_lease_statements_total"
    }
    return {
        "backend": backend,
        "chats": chats,
        "orphans": orphans,
        "whole": whole,
        "accepting_s": accepting,
        "complete_s": complete,
        "renewals": statements.get("renew", 0.0),
        "checks": statements.get("check", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=["sqlite", "postgresql"])
    parser.add_argument("--chats", type=int, default=16)
    parser.add_argument("--json")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    print(machine_report())
    results = []
    with workdir(args.keep_logs) as wd:
        for backend in backends(args.backend or ["sqlite", "postgresql"]):
            results.append(run(backend, args.chats, wd))
    print(
        table(
            [
                "db",
                "chats",
                "orphaned",
                "complete & whole",
                "accepting again (s)",
                "orphans complete (s)",
                "lease renewals / reply",
                "stop checks / reply",
            ],
            [
                [
                    r["backend"],
                    r["chats"],
                    r["orphans"],
                    r["whole"],
                    fmt(r["accepting_s"] or float("nan")),
                    fmt(r["complete_s"] or float("nan")),
                    fmt(r["renewals"] / r["chats"], 2),
                    fmt(r["checks"] / r["chats"], 2),
                ]
                for r in results
            ],
        )
    )
    print("(counters of the surviving worker and the replacement; the killed worker's are lost)")
    finish(args.json, results)


if __name__ == "__main__":
    main()
