"""Several hosts behind HAProxy: lost messages, wrong replies, first-token and push latency.

The topology of tests/test_multi_host.py (tests/support/multi_host.py): app hosts
(gunicorn) and reply-worker hosts (Celery), each in its own network namespace as root
(else on its own loopback address), behind HAProxy doing round-robin, in queue mode with
REPLY_EVENTS, on PostgreSQL through a PgBouncer, with a redis-server of the run's own.
``--chats`` clients post one message each and stream its reply through HAProxy at once.

Layouts: ``across`` (2 app hosts + 2 worker hosts: every stream is pushed from another
host) and ``one-host`` (1 host running gunicorn and the Celery worker, still behind
HAProxy and Redis). Faults (``--faults``, across only): reply worker 0 SIGKILLed
mid-reply, Redis restarted empty, app host 0 restarted.

Figures, all on this machine's one clock (time.time()):
- lost: acknowledged (202) messages not stored; wrong: replies not ``complete`` with
  exactly the model's text, in the database or as the client assembled its stream;
- first token added: the client's first text event minus the model's own send of its
  first token (the fake model logs it, ``--first-delay`` after the request), p50/p95; also
  for only the streams already open when that token left (the others add their client's
  own post and connect time, under a burst of chats);
- push, commit -> client: the client's receipt of the final status (``done``) minus the
  writer's timestamp on that final write (``updated_at``, taken just before its commit), p50/p95;
- stop -> client: every ``--stop-every``-th chat stops its reply (POST .../stop through
  HAProxy) a second after its first text; the client's ``done`` (stopped) minus the stop's
  ``updated_at``, p50/p95. The stop's view publishes the notice after its commit.

Targets: first token added <= 50 ms at p50; commit -> client and stop -> client <= 100 ms.

    python bench/multi_host.py [--chats 200] [--ramp 5] [--stop-every 10] [--layout across one-host] [--faults]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.databases import Database  # noqa: E402
from bench.lifecycle import workdir  # noqa: E402
from bench.report import finish, fmt, machine_report, print_verdicts, table  # noqa: E402
from tests.support.chats import Chat, epoch, run_chat, sign_up  # noqa: E402
from tests.support.load import percentile  # noqa: E402
from tests.support.multi_host import Cluster, inject_faults, stored_messages  # noqa: E402
from tests.support.servers import process_cpu_seconds  # noqa: E402


def stop_soon(url: str, token: str, chat: Chat, deadline: float) -> None:
    """Stop ``chat``'s reply (through HAProxy, so often on another host than its stream) a
    second after its client's first text."""
    while chat.first_text_at is None and chat.status is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    stop = f"{url}/api/v1/conversations/{chat.conversation_id}/messages/{chat.reply_id}/stop"
    with contextlib.suppress(requests.RequestException):  # then it ends complete: counted as wrong
        requests.post(stop, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def right(chat: Chat, row: tuple | None, expected: str, may_stop: bool) -> bool:
    """Complete with exactly the model's text, or stopped with a start of it, in the database
    and as the client assembled it."""
    if row is None:
        return False
    content, status = row[2], row[3]
    if may_stop and status == "stopped":
        return expected.startswith(content) and (chat.text, chat.status) == (content, "stopped")
    return (content, status) == (expected, "complete") and (chat.text, chat.status) == (expected, "complete")


def hosts_cpu(cluster: Cluster) -> float:
    """CPU seconds so far of the app hosts' gunicorns and the worker hosts' Celery processes
    (those running now: a restarted process starts from zero, so a fault run under-counts)."""
    workers = [worker.process.pid for worker in cluster.workers if worker.process is not None]
    return sum(app.cpu_seconds() for app in cluster.apps) + sum(process_cpu_seconds(pid) for pid in workers)


def run(layout: str, faults: bool, args, wd: Path) -> dict:
    with Database("postgresql", wd) as database:
        log_dir = wd / f"{layout}-{'faults' if faults else 'clean'}"
        log_dir.mkdir()
        hosts = 2 if layout == "across" else 1  # app hosts, and as many worker hosts
        with Cluster(
            database.uri,
            log_dir,
            words=args.words,
            delay=args.delay,
            first_delay=args.first_delay,
            colocate=layout == "one-host",
            app_hosts=hosts,
            worker_hosts=hosts,
        ) as cluster:
            where = cluster.topology.describe()
            token, conversation_ids = sign_up(cluster.url, args.chats)
            chats = [Chat(conversation_id, f"chat {n}") for n, conversation_id in enumerate(conversation_ids)]
            deadline = time.monotonic() + 300
            clients = [
                threading.Thread(target=run_chat, args=(cluster.url, token, chat, deadline), daemon=True)
                for chat in chats
            ]
            started = time.monotonic()
            cpu_before = sum(os.times()[:2])
            hosts_before = hosts_cpu(cluster)
            # Every --stop-every-th chat stops its reply a second after its first text.
            stopped = chats[:: args.stop_every] if args.stop_every else []
            stoppers = {
                id(chat): threading.Thread(target=stop_soon, args=(cluster.url, token, chat, deadline))
                for chat in stopped
            }
            for index, (chat, client) in enumerate(zip(chats, clients, strict=True)):
                # Chats start evenly over --ramp seconds (people do not all press Enter at once).
                time.sleep(max(0.0, started + args.ramp * index / len(clients) - time.monotonic()))
                client.start()
                if id(chat) in stoppers:
                    stoppers[id(chat)].start()
            if faults:
                inject_faults(cluster, chats)
            for stopper in stoppers.values():
                stopper.join(max(1.0, deadline - time.monotonic()))
            for client in clients:
                client.join(max(1.0, deadline - time.monotonic()))
            elapsed = time.monotonic() - started
            # This process: the clients and the model, a load of its own on a small machine.
            bench_cpu = sum(os.times()[:2]) - cpu_before
            hosts_used = hosts_cpu(cluster) - hosts_before
            rows = stored_messages(database.uri)
            first_sent = dict(cluster.model.first_sent)
            expected = {chat.content: cluster.model.expected(chat.content) for chat in chats}
    users = Counter((row[0], row[2]) for row in rows if row[1] == "user")
    replies = {row[5]: row for row in rows if row[1] == "assistant"}
    acknowledged = [chat for chat in chats if chat.acknowledged]
    lost = [chat for chat in acknowledged if users[(chat.conversation_id, chat.content)] != 1]
    stopping = {chat.conversation_id for chat in stopped}
    wrong = [
        chat
        for chat in acknowledged
        if not right(chat, replies.get(chat.reply_id), expected[chat.content], chat.conversation_id in stopping)
    ]
    ttft = [
        chat.first_text_at - first_sent[chat.content][0]
        for chat in acknowledged
        if chat.first_text_at is not None and first_sent.get(chat.content)
    ]
    # Streams that were not yet open when the model sent its first token (their client was
    # still posting or connecting): their added time is the client's own start-up.
    late = [
        chat
        for chat in acknowledged
        if chat.stream_opened_at is None
        or (first_sent.get(chat.content) and chat.stream_opened_at > first_sent[chat.content][0])
    ]
    ttft_open = [
        chat.first_text_at - first_sent[chat.content][0]
        for chat in acknowledged
        if chat not in late and chat.first_text_at
    ]
    # Commit -> client: the final write's (or the stop's) timestamp to the client's ``done``.
    push = [
        chat.done_at - epoch(replies[chat.reply_id][6])
        for chat in acknowledged
        if chat.done_at is not None and chat.reply_id in replies and chat.status == "complete"
    ]
    stop_push = [
        chat.done_at - epoch(replies[chat.reply_id][6])
        for chat in acknowledged
        if chat.done_at is not None and chat.reply_id in replies and chat.status == "stopped"
    ]
    return {
        "layout": layout,
        "faults": faults,
        "where": where,
        "chats": len(chats),
        "acknowledged": len(acknowledged),
        "lost": len(lost),
        "wrong": len(wrong),
        "reconnected": sum(1 for chat in chats if chat.connections > 1),
        "stream_elsewhere": sum(1 for chat in chats if any(host != chat.post_host for host in chat.stream_hosts)),
        "seconds": elapsed,
        "late_streams": len(late),
        "bench_cpu_share": bench_cpu / elapsed,
        "hosts_cpu_share": hosts_used / elapsed,
        "ttft_added_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_added_p95_ms": percentile(ttft, 95) * 1000,
        "ttft_open_p50_ms": percentile(ttft_open, 50) * 1000,
        "ttft_open_p95_ms": percentile(ttft_open, 95) * 1000,
        "push_p50_ms": percentile(push, 50) * 1000,
        "push_p95_ms": percentile(push, 95) * 1000,
        "push_max_ms": max(push) * 1000,
        "stops": len(stop_push),
        "stop_push_p50_ms": percentile(stop_push, 50) * 1000,
        "stop_push_p95_ms": percentile(stop_push, 95) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--layout", nargs="+", default=["across", "one-host"], choices=["across", "one-host"])
    parser.add_argument("--faults", action="store_true", help="also a run with faults (across only)")
    parser.add_argument("--no-clean-run", action="store_true", help="only the run with faults")
    parser.add_argument("--words", type=int, default=24, help="words per reply")
    parser.add_argument("--delay", type=float, default=0.3, help="seconds between the model's words")
    parser.add_argument("--first-delay", type=float, default=0.5, help="seconds before the model's first word")
    parser.add_argument("--stop-every", type=int, default=10, help="every n-th chat stops its reply (0: none)")
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which the chats start")
    parser.add_argument("--json")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    print(machine_report())
    plan = [(layout, False) for layout in args.layout if not args.no_clean_run]
    if args.faults and "across" in args.layout:
        plan.append(("across", True))
    results = []
    with workdir(args.keep_logs) as wd:
        for layout, faults in plan:
            results.append(run(layout, faults, args, wd))
            result = results[-1]
            print(
                f"# {layout}{' with faults' if faults else ''}: {result['where']}; {result['seconds']:.1f} s; "
                f"clients + model used {result['bench_cpu_share']:.2f} CPU, app and worker hosts "
                f"{result['hosts_cpu_share']:.2f} CPU (of {os.cpu_count()})",
                flush=True,
            )
    print(
        table(
            [
                "layout",
                "faults",
                "chats",
                "acked",
                "lost",
                "wrong",
                "streams resumed",
                "stream on other host",
                "first token added p50",
                "p95",
                "streams open first",
                "their p50",
                "p95",
                "commit->client p50",
                "p95",
                "max",
                "stops",
                "stop->client p50",
                "p95",
            ],
            [
                [
                    r["layout"],
                    "yes" if r["faults"] else "no",
                    r["chats"],
                    r["acknowledged"],
                    r["lost"],
                    r["wrong"],
                    r["reconnected"],
                    r["stream_elsewhere"],
                    f"{fmt(r['ttft_added_p50_ms'], 0)} ms",
                    f"{fmt(r['ttft_added_p95_ms'], 0)} ms",
                    r["chats"] - r["late_streams"],
                    f"{fmt(r['ttft_open_p50_ms'], 0)} ms",
                    f"{fmt(r['ttft_open_p95_ms'], 0)} ms",
                    f"{fmt(r['push_p50_ms'], 0)} ms",
                    f"{fmt(r['push_p95_ms'], 0)} ms",
                    f"{fmt(r['push_max_ms'], 0)} ms",
                    r["stops"],
                    f"{fmt(r['stop_push_p50_ms'], 0)} ms",
                    f"{fmt(r['stop_push_p95_ms'], 0)} ms",
                ]
                for r in results
            ],
        )
    )
    verdicts = []
    for r in results:
        name = f"{r['layout']}{' with faults' if r['faults'] else ''}"
        ttft_ok = "met" if r["ttft_added_p50_ms"] <= 50 else f"MISSED by {r['ttft_added_p50_ms'] - 50:.0f} ms"
        push_ok = "met" if r["push_p95_ms"] <= 100 else f"MISSED at p95 by {r['push_p95_ms'] - 100:.0f} ms"
        verdicts.append(f"{name}: first token added <= 50 ms at p50: {ttft_ok}; commit->client <= 100 ms: {push_ok}")
        stop_ok = "met" if r["stop_push_p95_ms"] <= 100 else f"MISSED at p95 by {r['stop_push_p95_ms'] - 100:.0f} ms"
        verdicts.append(f"{name}: stop->client <= 100 ms: {stop_ok}")
        verdicts.append(f"{name}: lost {r['lost']}, wrong {r['wrong']} (target 0 and 0)")
    print_verdicts(verdicts)
    finish(args.json, results)


if __name__ == "__main__":
    main()
