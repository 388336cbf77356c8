"""Benchmark: the messages list and the bot's history read on a conversation with branches.

A 1,000-message conversation with 20 branches (a trunk of 480 messages, and 20 branches of
26 messages forking from it every 24 messages; the current branch is the last one), and a
linear 1,000-message conversation for comparison. In this process, on each backend, it
times chatapp's own calls, each in a request's session as the views make them:

  list first   chat.list_messages(conversation, 20): the first page (oldest first)
  list deep    the same with a cursor 90% of the way down the current branch
  history      chat.reply_history(reply): what the pending reply at the branch's end is sent
               (BOT_HISTORY_MAX_CHARS of 100,000: about 700 messages of ~140 characters)
  claim        reply_store.claim_reply(reply): a reply worker's claim of that reply, in its
               own unit of work (the lease, the conversation's settings, the history), the
               reply put back unclaimed between calls (not timed, not counted)
  siblings     chat.list_siblings(message): the versions of the current branch's first
               message (it and the trunk's message beside it), as GET .../siblings reads them

It prints the median and 95th percentile in ms, and the SQL statements per call (all of
them: on SQLite the claim's count includes its BEGIN IMMEDIATE). Run it at
another checkout (a commit before branches) with --linear-only for the "before" figures.

    python bench/branches.py [--backend sqlite postgresql] [--calls 300] [--linear-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from bench.databases import Database, backends  # noqa: E402
from bench.lifecycle import workdir  # noqa: E402

MESSAGES = 1000
BRANCHES = 20
BRANCH_LENGTH = 26
TEXT = "message {n}: the quick brown fox jumps over the lazy dog, " * 2


def make_app(uri: str):
    from chatapp import create_app

    return create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "bench",
            "SQLALCHEMY_DATABASE_URI": uri,
            "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000",
            "REPLY_SWEEP_INTERVAL": 0,
            "RATELIMIT_ENABLED": False,
        }
    )


def insert_chain(session, conversation_id: int, parent_id: int | None, count: int, tree: bool, start: int) -> list[int]:
    """``count`` messages alternating user/assistant, each the child of the one before."""
    from chatapp.chat.models import Message, Role, Status
    from chatapp.db import utcnow

    ids, now = [], utcnow()
    for n in range(count):
        values = {
            "conversation_id": conversation_id,
            "role": Role.USER if n % 2 == 0 else Role.ASSISTANT,
            "content": TEXT.format(n=start + n),
            "status": Status.COMPLETE,
            "created_at": now,
            "updated_at": now,
        }
        if tree:
            values["parent_id"] = parent_id
        message = Message(**values)
        session.add(message)
        session.flush()
        parent_id = message.id
        ids.append(message.id)
    return ids


def seed(app, branched: bool) -> tuple[int, int, list[int]]:
    """A conversation as described above; (conversation id, pending reply id, current branch ids)."""
    from chatapp.auth import services as auth
    from chatapp.chat import services as chat
    from chatapp.chat.models import Conversation, Message, Status
    from chatapp.db import unit_of_work

    with unit_of_work(app) as session:
        tree = "parent_id" in {c["name"] for c in sa.inspect(session.connection()).get_columns("messages")}
        user = auth.find_user("bench") or auth.create_user("bench", "bench-password")
        conversation_id = chat.create_conversation(user.id, "branches" if branched else "linear").id
        if branched:
            trunk = insert_chain(session, conversation_id, None, MESSAGES - BRANCHES * BRANCH_LENGTH, tree, 0)
            branch: list[int] = []
            for b in range(BRANCHES):
                fork = b * (len(trunk) // BRANCHES) + 1  # after an assistant message of the trunk (odd index)
                branch = trunk[: fork + 1] + insert_chain(
                    session, conversation_id, trunk[fork], BRANCH_LENGTH, tree, 10_000 * (b + 1)
                )
        else:
            branch = insert_chain(session, conversation_id, None, MESSAGES, tree, 0)
        # The branch ends with a reply being generated, whose history is read.
        last = session.get(Message, branch[-1])
        if last.role.value == "user":
            raise RuntimeError("the branch should end with a reply")
        last.status, last.content = Status.PENDING, ""
        if tree:
            session.get(Conversation, conversation_id).current_leaf_id = branch[-1]
        return conversation_id, branch[-1], branch


def measure(app, call, calls: int, reset=None) -> tuple[float, float, float]:
    """Median and p95 ms of ``call`` in a request's session, and statements per call;
    ``reset`` runs before each call, untimed and uncounted."""
    from chatapp.db import db

    with app.app_context():
        engine = db.engine
    statements = [0]

    def count(*args):
        statements[0] += 1

    times = []
    for _ in range(calls + 20):
        if reset is not None:
            reset()
        with app.test_request_context():
            sa.event.listen(engine, "before_cursor_execute", count)
            started = time.perf_counter()
            call()
            db.session.rollback()
            times.append((time.perf_counter() - started) * 1000)
            sa.event.remove(engine, "before_cursor_execute", count)
    times = times[20:]  # warm-up: compiled statement caches, connections
    per_call = statements[0] / (calls + 20)
    return statistics.median(times), statistics.quantiles(times, n=20)[18], per_call


def unclaim(app, reply_id: int) -> None:
    """Put the reply back as it was before any worker claimed it."""
    from chatapp.chat.models import Message, Status
    from chatapp.db import unit_of_work

    with unit_of_work(app) as session:
        session.execute(
            sa.update(Message)
            .where(Message.id == reply_id)
            .values(lease_owner=None, lease_expires_at=None, runs=0, attempt=0, status=Status.PENDING, content="")
        )


def run_backend(backend: str, args, wd: Path) -> list[list[str]]:
    from chatapp.chat import reply_store
    from chatapp.chat import services as chat

    rows = []
    with Database(backend, wd) as database:
        app = make_app(database.uri)
        kinds = [False] if args.linear_only else [False, True]
        for branched in kinds:
            conversation_id, reply_id, branch = seed(app, branched)
            deep = chat._encode_cursor(branch[int(len(branch) * 0.9)])
            with app.test_request_context():
                first = chat.list_messages(conversation_id, 20)
                assert [m.id for m in first.items] == branch[:20], "the first page is not the branch's start"
                history = chat.reply_history(reply_id)
                assert history is not None and history[1], "no history read"
                chat.db.session.rollback()
            label = f"{'20 branches' if branched else 'linear'} ({len(branch)} on the branch)"
            cases = {
                "list first page": lambda c=conversation_id: chat.list_messages(c, 20),
                "list deep page": lambda c=conversation_id, d=deep: chat.list_messages(c, 20, d),
                "reply_history": lambda r=reply_id: chat.reply_history(r),
            }
            resets = {}
            if not args.linear_only:
                cases["claim_reply"] = lambda r=reply_id: reply_store.claim_reply(app, r, "bench:1:x")
                resets["claim_reply"] = lambda r=reply_id: unclaim(app, r)
                if branched:  # the fork of the last branch, in the middle of the trunk
                    fork = branch[(BRANCHES - 1) * ((MESSAGES - BRANCHES * BRANCH_LENGTH) // BRANCHES) + 2]
                    cases["list_siblings"] = lambda c=conversation_id, m=fork: chat.list_siblings(c, m)
            for name, call in cases.items():
                median, p95, statements = measure(app, call, args.calls, resets.get(name))
                rows.append([backend, label, name, f"{median:.2f}", f"{p95:.2f}", f"{statements:.0f}"])
                print("# " + " | ".join(rows[-1]), flush=True)
        with app.app_context():
            chat.db.engine.dispose()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per case")
    parser.add_argument("--linear-only", action="store_true", help="only the linear conversation (any checkout)")
    args = parser.parse_args(argv)
    rows = []
    with workdir() as wd:
        for backend in backends(args.backend):
            rows += run_backend(backend, args, wd)
    print("| backend | conversation | call | median ms | p95 ms | statements |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
