"""Diagnostic: CPU milliseconds per operation, in process, without gunicorn or a network.

The throughput benchmarks run on a machine shared with other work, so their absolute
figures move with the load average. CPU time per operation (time.process_time, one
thread, the Flask test client) hardly does, and it explains them: how much each app
spends on one messages-list request, and what one chatapp reply costs in total (the
POST, the stream request, one write every REPLY_FLUSH_INTERVAL, and the stream's reads:
one every 5 s when the stream is served by the worker running its reply, one every
STREAM_POLL_INTERVAL when it is not), hence how many replies/s two cores can carry at most.

    python bench/request_cost.py [--backend sqlite postgresql] [--profile]
    python bench/request_cost.py --throughput [--rounds 5] [--seconds 8] [--connections 32]

--throughput measures instead the target of a cheaper request: requests/s of
GET /api/v1/conversations/<id>/messages (20 of 50) on chatapp, the textbook app and the
core floor, each under gunicorn (gunicorn.conf.py, 2 workers x 8 threads by default,
chatapp with every production feature on, MAX_REQUESTS=0), loaded by wrk with 32
connections; rounds interleaved (the order rotates), so that the apps of one round saw
the same background load. It prints each round with the load average, each app's server
CPU per request, and the ratios chatapp/textbook and chatapp/core floor per round and
their medians (targets: >= 1.0x the textbook app, >= 0.8x the core floor).

--profile adds, for the messages-list request, where chatapp's and the textbook app's
CPU goes, by package (cProfile; its overhead inflates every figure about 2x).

Besides chatapp, the textbook app and the ceiling (bench/ceiling_app.py, the raw driver),
the messages list is measured on a "core floor": the ceiling's three statements through
SQLAlchemy Core on a plain engine (its default pool) in a bare Flask route, with no ORM
and no Flask-SQLAlchemy. Core floor minus ceiling is what SQLAlchemy itself costs.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import importlib
import os
import pstats
import secrets
import sys
import time
from datetime import timedelta
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import BENCH_CONFIG, Server  # noqa: E402
from bench.core_floor_app import build_core_floor  # noqa: E402
from bench.databases import Database, backends, seed  # noqa: E402
from bench.lifecycle import ROOT, workdir  # noqa: E402
from bench.load import load  # noqa: E402
from bench.metrics import checked_out_by_pid  # noqa: E402
from bench.report import finish, fmt, loadavg, machine_report, median, table  # noqa: E402
from tests.support.metrics import scrape  # noqa: E402

CONTENT = "the quick brown fox jumps over the lazy dog"
WORDS = len(CONTENT.split())


def cpu_ms(fn, n: int, rounds: int = 5) -> float:
    """Median over rounds of the CPU milliseconds per call."""
    for _ in range(max(5, n // 10)):
        fn()
    samples = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(n):
            fn()
        samples.append((time.process_time() - started) / n * 1000)
    return sorted(samples)[len(samples) // 2]


class _NoRunner:
    """Stands in for the reply runner so that a POST's cost excludes the reply's."""

    def reserve(self):
        from chatapp.chat.runner import Reservation

        return Reservation()  # nothing to bound: no reply runs

    def submit(self, reply_id, reservation=None):
        pass

    def wait_idle(self, timeout=None):
        return True


def measure(backend: str, wd: Path, n: int, profile: bool) -> tuple[dict, dict]:
    from chatapp import create_app
    from chatapp.chat import leases, services
    from chatapp.chat.models import Message, Role, Status
    from chatapp.chat.pipeline import generate_reply
    from chatapp.chat.reply_store import ReplyWriter
    from chatapp.chat.runner import EXTENSION_KEY
    from chatapp.db import db, unit_of_work, utcnow

    costs: dict[str, float] = {}
    profiles: dict[str, collections.Counter] = {}
    with Database(backend, wd) as database:
        seeded = seed(database.uri, conversations=4, messages=50)
        os.environ["CHATAPP_SQLALCHEMY_DATABASE_URI"] = database.uri
        headers = {"Authorization": f"Bearer {seeded.token}"}
        listing = f"/api/v1/conversations/{seeded.conversation_ids[0]}/messages?limit=20"
        # The per-user bounds as the gunicorn benchmarks set them: one user sends every request.
        app = create_app(
            {
                "SECRET_KEY": secrets.token_hex(32),
                "SQLALCHEMY_DATABASE_URI": database.uri,
                "REPLY_SWEEP_INTERVAL": 0,
                "BOT_ECHO_DELAY": 0,
                **BENCH_CONFIG,
            }
        )
        app.extensions[EXTENSION_KEY] = _NoRunner()
        # Both read the database URL when imported: import afresh for every backend.
        textbook = _fresh_import("bench.textbook_app")
        textbook.bot.delay = 0.0
        ceiling = _fresh_import("bench.ceiling_app").app
        floor, floor_engine = build_core_floor(database.uri)
        clients = {
            "chatapp": app.test_client(),
            "textbook": textbook.app.test_client(),
            "core floor": floor.test_client(),
            "ceiling": ceiling.test_client(),
        }

        for name, client in clients.items():

            def get(client=client):
                response = client.get(listing, headers=headers)
                assert response.status_code == 200, response.data

            costs[f"GET messages (20 of 50): {name}"] = cpu_ms(get, n)
            if profile and name in ("chatapp", "textbook"):
                profiles[name] = _profile(get, n)

        # chatapp's reply, piece by piece, on conversations of their own.
        post_conv, stream_conv = seeded.conversation_ids[1:3]
        client = clients["chatapp"]

        def post():
            response = client.post(
                f"/api/v1/conversations/{post_conv}/messages", json={"content": CONTENT}, headers=headers
            )
            assert response.status_code == 202, response.data
            # Let the next POST through (one reply in progress per conversation).
            with unit_of_work(app) as session:
                session.get(Message, response.json["reply"]["id"]).status = Status.COMPLETE

        costs["chatapp POST message (202, reply not run)"] = cpu_ms(post, max(20, n // 4))

        with unit_of_work(app) as session:
            now = utcnow()
            done = Message(
                conversation_id=stream_conv,
                role=Role.ASSISTANT,
                content=CONTENT,
                status=Status.COMPLETE,
                created_at=now,
                updated_at=now,
            )
            session.add(done)
            session.flush()
            done_id = done.id

        def stream():
            response = client.get(f"/api/v1/conversations/{stream_conv}/messages/{done_id}/stream", headers=headers)
            body = response.get_data()
            assert b"event: done" in body, body

        costs["chatapp stream request (reply already complete)"] = cpu_ms(stream, max(20, n // 4))

        def poll():
            with unit_of_work(app, write=False):
                services.read_reply_progress(done_id, 0)

        costs["chatapp one stream poll (unit of work + read)"] = cpu_ms(poll, n)

        # A reply this process holds the lease of, as the reply runner's writer does.
        owner = leases.process_owner()
        with unit_of_work(app) as session:
            now = utcnow()
            pending = Message(
                conversation_id=stream_conv,
                role=Role.ASSISTANT,
                content="",
                status=Status.STREAMING,
                created_at=now,
                updated_at=now,
                lease_owner=owner,
                lease_expires_at=now + timedelta(hours=1),
            )
            session.add(pending)
            session.flush()
            pending_id = pending.id
        writer = ReplyWriter(app, pending_id, 0, owner)
        costs["chatapp one reply write (append)"] = cpu_ms(lambda: writer.append("word "), max(20, n // 4))

        # generate_reply alone: pending replies made beforehand, one conversation each,
        # so that every reply reads the same short history.
        calls = max(20, n // 4)
        with unit_of_work(app) as session:
            now = utcnow()
            pending_ids = []
            for _ in range(calls * 6 + max(5, calls // 10)):
                conversation = services.create_conversation(seeded.user_id, "pipeline")
                _message, reply = services.post_message(conversation, CONTENT)
                pending_ids.append(reply.id)
        queue = iter(pending_ids)
        costs["chatapp reply pipeline, 0 s bot (history + finish)"] = cpu_ms(
            lambda: generate_reply(app, next(queue)), calls
        )

        tclient = clients["textbook"]
        # A fresh conversation per call too: the textbook reply reads the whole history.
        with unit_of_work(app):
            textbook_ids = iter(
                [
                    services.create_conversation(seeded.user_id, "textbook").id
                    for _ in range(calls * 6 + max(5, calls // 10))
                ]
            )

        def textbook_post():
            response = tclient.post(
                f"/api/v1/conversations/{next(textbook_ids)}/messages", json={"content": CONTENT}, headers=headers
            )
            assert response.status_code == 201, response.data

        costs["textbook POST message incl. reply (0 s bot)"] = cpu_ms(textbook_post, calls)

        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()
        with textbook.app.app_context():
            textbook.db.engine.dispose()
        floor_engine.dispose()
    return costs, profiles


def _fresh_import(name: str):
    module = sys.modules.get(name)
    return importlib.reload(module) if module else importlib.import_module(name)


def _profile(fn, n: int) -> collections.Counter:
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    for _ in range(n):
        fn()
    profiler.disable()
    totals: collections.Counter = collections.Counter()
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in pstats.Stats(profiler).stats.items():
        if "site-packages/" in filename:
            key = filename.split("site-packages/")[1].split("/")[0]
        elif str(ROOT) in filename:
            key = "/".join(Path(filename).relative_to(ROOT).parts[:2])
        elif filename.startswith("~"):
            key = "C builtins"
        else:
            key = "stdlib " + Path(filename).name
        totals[key] += tottime * 1000 / n
    return totals


# --- --throughput: chatapp against the textbook app and the core floor, under gunicorn ----

THROUGHPUT_APPS = [
    ("textbook", "bench.textbook_app:app"),
    ("core_floor", "bench.core_floor_app:app"),
    ("chatapp", "wsgi:app"),
]
TARGET_VS_TEXTBOOK, TARGET_VS_FLOOR = 1.0, 0.8


def throughput(backend: str, wd: Path, args) -> dict:
    with Database(backend, wd) as database:
        seeded = seed(database.uri, conversations=2, messages=50)
        path = f"/api/v1/conversations/{seeded.conversation_ids[0]}/messages?limit=20"
        headers = {"Authorization": f"Bearer {seeded.token}"}
        servers = {}
        try:
            for name, module in THROUGHPUT_APPS:
                servers[name] = Server(
                    module,
                    database.uri,
                    wd,
                    name=f"cost-{name}-{backend}",
                    workers=args.workers,
                    threads=args.threads,
                    env={"CHATAPP_MAX_REQUESTS": 0},
                ).start()
            pages = set()
            for server in servers.values():
                response = requests.get(server.url + path, headers=headers, timeout=10)
                response.raise_for_status()
                pages.add(tuple((m["id"], m["content"]) for m in response.json()["items"]))
            if len(pages) != 1:
                raise RuntimeError(f"the apps disagree on the page: {pages}")
            for server in servers.values():  # every worker thread's connection, caches
                load(server.url + path, headers=headers, seconds=2, connections=args.connections)
            rounds: list[dict] = []
            order = list(servers)
            for round_no in range(args.rounds):
                results = {}
                for name in order[round_no % len(order) :] + order[: round_no % len(order)]:
                    server = servers[name]
                    cpu_before = server.cpu_seconds()
                    result = load(
                        server.url + path, headers=headers, seconds=args.seconds, connections=args.connections
                    )
                    result.server_cpu_seconds = server.cpu_seconds() - cpu_before
                    if result.non_2xx or result.socket_errors:
                        raise RuntimeError(f"{name}: {result.non_2xx} non-2xx, {result.socket_errors} socket errors")
                    results[name] = result
                    time.sleep(0.3)
                load_now = loadavg()
                rounds.append({"results": results, "loadavg": load_now})
                print(
                    f"# {backend} round {round_no + 1}: "
                    + ", ".join(
                        f"{name} {r.rps:,.0f} req/s ({1000 * r.server_cpu_seconds / max(r.requests, 1):.2f} ms CPU/req)"
                        for name, r in results.items()
                    )
                    + f"; chatapp/textbook {results['chatapp'].rps / results['textbook'].rps:.2f}x, "
                    f"chatapp/core floor {results['chatapp'].rps / results['core_floor'].rps:.2f}x; load {load_now}",
                    flush=True,
                )
            leaks = checked_out_by_pid(scrape(servers["chatapp"].url))
        finally:
            for server in servers.values():
                server.stop()
    return {"rounds": rounds, "checked_out_after": leaks}


def throughput_main(args) -> int:
    print(machine_report())
    print(
        f"# messages list under gunicorn: {args.rounds} interleaved rounds x {args.seconds:g} s per app, "
        f"wrk -c{args.connections}, gunicorn workers={args.workers} threads={args.threads}",
        flush=True,
    )
    rows, verdicts = [], []
    with workdir() as wd:
        for backend in backends(args.backend):
            data = throughput(backend, wd, args)
            rounds = data["rounds"]
            for name, _module in THROUGHPUT_APPS:
                results = [r["results"][name] for r in rounds]
                rows.append(
                    [
                        backend,
                        name,
                        fmt(median([r.rps for r in results]), 0),
                        " / ".join(fmt(r.rps, 0) for r in results),
                        fmt(median([1000 * r.server_cpu_seconds / max(r.requests, 1) for r in results]), 2),
                        fmt(median([r.p50_ms for r in results])),
                    ]
                )
            vs_textbook = [r["results"]["chatapp"].rps / r["results"]["textbook"].rps for r in rounds]
            vs_floor = [r["results"]["chatapp"].rps / r["results"]["core_floor"].rps for r in rounds]
            verdicts.append(
                f"{backend}: chatapp / textbook per round {' '.join(f'{x:.2f}' for x in vs_textbook)}, median "
                f"{median(vs_textbook):.2f}x (target >= {TARGET_VS_TEXTBOOK}x: "
                f"{'met' if median(vs_textbook) >= TARGET_VS_TEXTBOOK else 'MISSED'}); chatapp / core floor "
                f"{' '.join(f'{x:.2f}' for x in vs_floor)}, median {median(vs_floor):.2f}x (target >= "
                f"{TARGET_VS_FLOOR}x: {'met' if median(vs_floor) >= TARGET_VS_FLOOR else 'MISSED'}); "
                f"load average per round: {' | '.join(r['loadavg'] for r in rounds)}; chatapp connections "
                f"checked out after: {data['checked_out_after'] or 'no /metrics'}"
            )
    print()
    print(table(["db", "app", "req/s (median)", "rounds", "server CPU ms/req (median)", "p50 ms"], rows))
    print()
    for line in verdicts:
        print("- " + line)
    print(f"load average at end: {loadavg()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("-n", type=int, default=200, help="calls per round (5 rounds)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="requests/s under gunicorn and wrk against the textbook app and the core floor",
    )
    parser.add_argument("--rounds", type=int, default=5, help="--throughput: interleaved rounds")
    parser.add_argument("--seconds", type=float, default=8, help="--throughput: seconds per app and round")
    parser.add_argument("--connections", type=int, default=32, help="--throughput: wrk connections")
    parser.add_argument("--workers", type=int, default=2, help="--throughput: gunicorn workers")
    parser.add_argument("--threads", type=int, default=8, help="--throughput: gunicorn threads per worker")
    args = parser.parse_args(argv)
    if args.throughput:
        return throughput_main(args)
    print(machine_report())
    from chatapp.config import Defaults

    all_costs = {}
    with workdir() as wd:
        for backend in backends(args.backend):
            costs, profiles = measure(backend, wd, args.n, args.profile)
            all_costs[backend] = costs
            for name, totals in profiles.items():
                print(f"\n# {backend}: where {name}'s messages-list CPU goes (cProfile, ms/request, inflated)")
                print(
                    table(
                        ["package", "ms"],
                        [[k, f"{v:.3f}"] for k, v in totals.most_common(14)]
                        + [["total", f"{sum(totals.values()):.3f}"]],
                    )
                )
    names = list(next(iter(all_costs.values())))
    print()
    print(
        table(
            ["operation (CPU ms, median of 5 rounds)", *all_costs],
            [[name, *(fmt(all_costs[b][name], 2) for b in all_costs)] for name in names],
        )
    )

    # What a whole reply costs chatapp, and what two cores could carry.
    from chatapp.chat.stream import LIVE_RECHECK_SECONDS

    poll, flush = Defaults.STREAM_POLL_INTERVAL, Defaults.REPLY_FLUSH_INTERVAL
    budget_rows = []
    for backend, c in all_costs.items():
        for delay in (0.5, 1.0, 3.0):
            # EchoBot yields WORDS chunks evenly over the delay; a write happens at the
            # first chunk after each flush interval, so at most one per chunk.
            writes = min(WORDS - 1, delay / flush)
            common_part = (
                c["chatapp POST message (202, reply not run)"]
                + c["chatapp stream request (reply already complete)"]
                + writes * c["chatapp one reply write (append)"]
                + c["chatapp reply pipeline, 0 s bot (history + finish)"]
            )
            one_read = c["chatapp one stream poll (unit of work + read)"]
            # In the reply's own worker the stream waits for the writer and reads the
            # database only every LIVE_RECHECK_SECONDS; in another worker it polls.
            live = common_part + int(delay // LIVE_RECHECK_SECONDS) * one_read
            polling = common_part + (delay / poll) * one_read
            textbook = c["textbook POST message incl. reply (0 s bot)"]
            budget_rows.append(
                [
                    backend,
                    fmt(delay, 1),
                    fmt(live, 1),
                    fmt(2000 / live, 0),
                    fmt(polling, 1),
                    fmt(2000 / polling, 0),
                    fmt(textbook, 1),
                    fmt(2000 / textbook, 0),
                ]
            )
    print()
    print(
        f"Per reply of {WORDS} words (REPLY_FLUSH_INTERVAL={flush:g} s; a stream in another worker polls "
        f"every STREAM_POLL_INTERVAL={poll:g} s, one in the reply's worker reads every "
        f"{LIVE_RECHECK_SECONDS:g} s): POST + stream request + min(words-1, delay/flush) writes + pipeline "
        "+ the stream's reads; '2-core max' = 2000 ms / CPU ms, if nothing else ran:"
    )
    print(
        table(
            [
                "db",
                "bot s",
                "chatapp CPU ms/reply",
                "2-core max replies/s",
                "same, stream polling",
                "2-core max replies/s (polling)",
                "textbook CPU ms/reply",
                "textbook 2-core max replies/s",
            ],
            budget_rows,
        )
    )
    finish(None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
