"""Replies in-process vs on a job queue: replies/s and time to first text.

Serves chatapp with gunicorn (2 workers) against a slow fake OpenAI-compatible server
(tests/fake_openai.py: ``--words`` words, ``--word-delay`` s apart), posts ``--chats``
messages (one conversation each) as fast as one client can, and reads the database every
20 ms: time to first text is from a reply's POST to its first stored text (so it includes
REPLY_FLUSH_INTERVAL), replies/s is all replies over the time from the first POST to the
last completion. In queue mode the same server only enqueues, and one Celery worker
(``--concurrency`` threads) runs the replies, with a Redis of its own. Nothing is
asserted: it prints a table (and --json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import requests
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import BENCH_CONFIG, Server  # noqa: E402
from bench.databases import Database, backends  # noqa: E402
from bench.lifecycle import on_exit, workdir  # noqa: E402
from bench.report import finish, fmt, machine_report, table  # noqa: E402
from tests.fake_openai import FakeOpenAIServer  # noqa: E402
from tests.support.queue import CeleryWorker, RedisServer  # noqa: E402


def progress(engine: sa.Engine) -> dict[int, tuple[str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, status, length(content) FROM messages WHERE role = 'assistant'")).all()
    return {row[0]: (row[1], row[2]) for row in rows}


def run(backend: str, mode: str, args, wd: Path) -> dict:
    words = [f"w{n} " for n in range(args.words)]
    with FakeOpenAIServer(reply_words=words, delay=args.word_delay) as model, Database(backend, wd) as database:
        env = {
            "CHATAPP_BOT_ENGINE": "openai",
            "CHATAPP_OPENAI_BASE_URL": model.base_url,
            "CHATAPP_RATELIMIT_ENABLED": "false",
        }
        redis_server = worker = None
        if mode == "queue":
            redis_server = RedisServer()
            redis_server.start()
            on_exit(redis_server.stop)
            env["CHATAPP_REPLY_QUEUE"] = redis_server.url
            config = {**BENCH_CONFIG, "BOT_ENGINE": "openai", "OPENAI_BASE_URL": model.base_url}
            worker = CeleryWorker(database.uri, redis_server.url, wd, config, concurrency=args.concurrency)
            worker.start()
            on_exit(worker.stop)
        engine = sa.create_engine(database.uri)
        try:
            with Server("wsgi:app", database.uri, wd, name=f"queue-{mode}", workers=2, threads=16, env=env) as server:
                credentials = {"username": "bench", "password": "correct horse"}
                requests.post(server.url + "/api/v1/users", json=credentials, timeout=30)
                token = requests.post(server.url + "/api/v1/tokens", json=credentials, timeout=30).json()["token"]
                headers = {"Authorization": f"Bearer {token}"}
                conversations = [
                    requests.post(server.url + "/api/v1/conversations", json={}, headers=headers, timeout=30).json()[
                        "id"
                    ]
                    for _ in range(args.chats)
                ]
                posted: dict[int, float] = {}
                started = time.monotonic()
                for conversation_id in conversations:
                    response = requests.post(
                        f"{server.url}/api/v1/conversations/{conversation_id}/messages",
                        json={"content": "hello"},
                        headers=headers,
                        timeout=30,
                    )
                    posted[response.json()["reply"]["id"]] = time.monotonic()
                first_text: dict[int, float] = {}
                done_at = None
                while time.monotonic() - started < 300:
                    now = time.monotonic()
                    rows = progress(engine)
                    for reply_id, (_status, length) in rows.items():
                        if length and reply_id not in first_text:
                            first_text[reply_id] = now - posted[reply_id]
                    if all(status in ("complete", "failed") for status, _ in rows.values()):
                        done_at = now
                        break
                    time.sleep(0.02)
                rows = progress(engine)
        finally:
            engine.dispose()
            if worker is not None:
                worker.stop()
            if redis_server is not None:
                redis_server.stop()
    ttft = sorted(first_text.values())
    return {
        "backend": backend,
        "mode": mode,
        "chats": args.chats,
        "complete": sum(1 for status, _ in rows.values() if status == "complete"),
        "replies_per_s": args.chats / (done_at - started) if done_at else None,
        "ttft_p50_ms": statistics.median(ttft) * 1000 if ttft else None,
        "ttft_max_ms": ttft[-1] * 1000 if ttft else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=["sqlite", "postgresql"])
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--words", type=int, default=20)
    parser.add_argument("--word-delay", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=64, help="the queue worker's threads")
    parser.add_argument("--json")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    print(machine_report())
    results = []
    with workdir(args.keep_logs) as wd:
        for backend in backends(args.backend or ["postgresql"]):
            for mode in ("in-process", "queue"):
                results.append(run(backend, mode, args, wd))
    print(
        table(
            ["db", "mode", "chats", "complete", "replies/s", "first text p50 (ms)", "first text max (ms)"],
            [
                [
                    r["backend"],
                    r["mode"],
                    r["chats"],
                    r["complete"],
                    fmt(r["replies_per_s"] or float("nan")),
                    fmt(r["ttft_p50_ms"] or float("nan"), 0),
                    fmt(r["ttft_max_ms"] or float("nan"), 0),
                ]
                for r in results
            ],
        )
    )
    finish(args.json, results)


if __name__ == "__main__":
    main()
