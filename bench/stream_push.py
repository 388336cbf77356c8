"""Streams of replies run elsewhere: polling the database vs Redis pub/sub notices (REPLY_EVENTS).

In one process, replies run as if in another process (no in-process live state: a
thread calls ``generate_reply`` directly, as a queue worker does), and streams are read
through ``reply_events``, for two settings: ``poll`` (no REPLY_EVENTS: a read every
STREAM_POLL_INTERVAL) and ``push`` (REPLY_EVENTS on a redis-server of the bench's own).

1. Idle streams: ``--streams`` streams of a reply nobody writes, for ``--seconds``; the
   database statements this process runs, per stream per second.
2. Time to first token: ``--replies`` concurrent replies from tests/fake_openai.py
   streaming 30 words over 3 s; for each, the time from the first chunk reaching the app
   (the model's own first token) to the first text event of its stream, p50/p95.

    python bench/stream_push.py [--backend sqlite postgresql] [--streams 20] [--seconds 6] [--replies 10]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import event  # noqa: E402

from bench.databases import Database, backends, seed  # noqa: E402
from bench.lifecycle import workdir  # noqa: E402
from tests.fake_openai import FakeOpenAIServer  # noqa: E402
from tests.support.load import percentile  # noqa: E402
from tests.support.queue import RedisServer  # noqa: E402
from tests.support.sse import parse_events  # noqa: E402

WORDS = [f" w{n}" for n in range(30)]


def make_app(uri: str, base_url: str, redis_url: str, seconds: float):
    from chatapp import create_app

    return create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "bench",
            "SQLALCHEMY_DATABASE_URI": uri,
            "REPLY_SWEEP_INTERVAL": 0,
            "RATELIMIT_ENABLED": False,
            "TITLES_ENABLED": False,
            "BOT_ENGINE": "openai",
            "OPENAI_BASE_URL": base_url,
            "STREAM_MAX_SECONDS": seconds,
            "REPLY_EVENTS": redis_url,
        }
    )


def connect(app) -> None:
    from chatapp.chat.reply_notices import get_reply_notices

    notices = get_reply_notices(app)
    if notices is not None:
        notices.register(0)
        notices.unregister(0)
        deadline = time.monotonic() + 15
        while not notices.available and time.monotonic() < deadline:
            time.sleep(0.05)


def stop_notices(app) -> None:
    from chatapp.chat.reply_notices import get_reply_notices

    notices = get_reply_notices(app)
    if notices is not None:
        notices.stop()


def post(client, token: str, conversation_id: int) -> int:
    response = client.post(
        f"/api/v1/conversations/{conversation_id}/messages",
        json={"content": "hello"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["reply"]["id"]


def idle_queries(app, seeded, streams: int, seconds: float) -> float:
    """Statements per open stream per second while its reply stores nothing."""
    from chatapp.chat.runner import get_runner
    from chatapp.chat.stream import reply_events
    from chatapp.db import db

    runner = get_runner(app)
    runner.submit = lambda reply_id, reservation=None: None  # nobody runs it: it stays pending
    client = app.test_client()
    reply_id = post(client, seeded.token, seeded.conversation_ids[0])
    connect(app)
    count = [0]
    with app.app_context():
        engine = db.engine

    def counted(*args):
        count[0] += 1

    event.listen(engine, "before_cursor_execute", counted)
    threads = [threading.Thread(target=lambda: list(reply_events(app, reply_id))) for _ in range(streams)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    elapsed = time.monotonic() - started
    event.remove(engine, "before_cursor_execute", counted)
    return count[0] / streams / elapsed


def first_token_delays(app, seeded, replies: int) -> list[float]:
    """Seconds from the first chunk reaching the app to its stream's first text event."""
    from chatapp.chat import pipeline
    from chatapp.chat.runner import get_runner
    from chatapp.chat.stream import reply_events

    arrived: dict[int, float] = {}
    make_bot = pipeline.bot_from_config

    def timed_bot(config):
        bot = make_bot(config)
        stream = bot.stream

        def timed_stream(history, cancel=None, **options):
            first = True
            for chunk in stream(history, cancel, **options):
                if first:
                    arrived[threading.get_ident()] = time.monotonic()
                    first = False
                yield chunk

        bot.stream = timed_stream  # type: ignore[method-assign]
        return bot

    pipeline.bot_from_config = timed_bot
    runs: dict[int, threading.Thread] = {}
    first_text: dict[int, float] = {}
    by_thread: dict[int, int] = {}

    def run(reply_id: int) -> None:
        by_thread[threading.get_ident()] = reply_id
        pipeline.generate_reply(app, reply_id)

    def submit(reply_id, reservation=None):
        runs[reply_id] = threading.Thread(target=run, args=(reply_id,))
        runs[reply_id].start()

    def read(reply_id: int) -> None:
        for chunk in reply_events(app, reply_id):
            if reply_id not in first_text and any(name == "message" for name, _ in parse_events(chunk)):
                first_text[reply_id] = time.monotonic()

    get_runner(app).submit = submit
    client = app.test_client()
    connect(app)
    readers = []
    for index in range(replies):
        reply_id = post(client, seeded.token, seeded.conversation_ids[1 + index])
        readers.append(threading.Thread(target=read, args=(reply_id,)))
        readers[-1].start()
    for thread in readers + list(runs.values()):
        thread.join(60)
    pipeline.bot_from_config = make_bot
    model_first = {by_thread[ident]: at for ident, at in arrived.items()}
    return [first_text[reply_id] - model_first[reply_id] for reply_id in first_text if reply_id in model_first]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", default=["sqlite"])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--replies", type=int, default=10)
    args = parser.parse_args()
    redis_server = RedisServer()
    redis_server.start()
    rows = []
    try:
        with workdir() as path, FakeOpenAIServer(reply_words=WORDS, delay=0.1) as model:
            for backend in backends(args.backend):
                for mode in ("poll", "push"):
                    with Database(backend, path) as database:
                        seeded = seed(database.uri, conversations=1 + args.replies)
                        url = redis_server.url if mode == "push" else ""
                        app = make_app(database.uri, model.base_url, url, args.seconds)
                        queries = idle_queries(app, seeded, args.streams, args.seconds)
                        stop_notices(app)
                        app = make_app(database.uri, model.base_url, url, 60)
                        delays = first_token_delays(app, seeded, args.replies)
                        stop_notices(app)
                        rows.append((backend, mode, queries, percentile(delays, 50), percentile(delays, 95)))
    finally:
        redis_server.stop()
    print(f"{'backend':<11} {'mode':<5} {'queries/idle stream/s':>22} {'TTFT added p50':>15} {'p95':>8}")
    for backend, mode, queries, p50, p95 in rows:
        print(f"{backend:<11} {mode:<5} {queries:>22.2f} {p50 * 1000:>13.0f}ms {p95 * 1000:>6.0f}ms")


if __name__ == "__main__":
    main()
