"""How long one conversation page holds its database connection: 100 messages, half of them
6 KB Markdown replies.

    PYTHONPATH=. .venv/bin/python bench/page_hold.py postgresql+psycopg://postgres@127.0.0.1:5432/postgres

Creates the scratch database chatapp_page_hold next to the one named (PostgreSQL) and drops
it afterwards, or uses a temporary file for a sqlite:// URL. Prints the median and worst
checkout-to-checkin time of the page's requests, and their whole duration.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import sqlalchemy as sa
from sqlalchemy import event

SCRATCH = "chatapp_page_hold"
RUNS = 10
PARAGRAPH = (
    "Here is **one way** to do it, with a [link](https://example.com/docs) and `inline code`.\n\n"
    "- first, read the rows\n- then end the transaction\n- then render\n\n"
    "```python\nfor row in rows:\n    print(row.id, row.content)\n```\n\n"
    "| step | holds |\n|---|---|\n| load | a connection |\n| render | nothing |\n\n"
)
REPLY = ("## A heading\n\n" + PARAGRAPH * 40)[:6000]


def scratch_url(base: str) -> tuple[str, callable]:
    url = sa.make_url(base)
    if url.get_backend_name() == "sqlite":
        path = tempfile.mkdtemp() + "/page_hold.sqlite"
        return f"sqlite:///{path}", lambda: None
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {SCRATCH}")
        conn.exec_driver_sql(f"CREATE DATABASE {SCRATCH}")

    def drop():
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {SCRATCH} WITH (FORCE)")
        admin.dispose()

    return url.set(database=SCRATCH).render_as_string(hide_password=False), drop


def main(base: str) -> None:
    from chatapp import create_app
    from chatapp.chat.models import Conversation, Message, Role, Status
    from chatapp.db import db
    from chatapp.db.schema import upgrade_to_latest

    uri, drop = scratch_url(base)
    try:
        app = create_app(
            {
                "SECRET_KEY": "page-hold-bench-" + "x" * 32,
                "SQLALCHEMY_DATABASE_URI": uri,
                "WTF_CSRF_ENABLED": False,
                "RATELIMIT_ENABLED": False,
                "REPLY_SWEEP_INTERVAL": 0,
                "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000",
                "HOLD_WARN_SECONDS": 60,
            }
        )
        with app.app_context():
            upgrade_to_latest()
        client = app.test_client()
        form = {"username": "bench", "password": "correct horse", "confirm": "correct horse"}
        assert client.post("/register", data=form).status_code == 302
        with app.app_context():
            user_id = db.session.scalar(sa.text("SELECT id FROM users WHERE username = 'bench'"))
            conversation = Conversation(owner_id=user_id, title="page hold")
            db.session.add(conversation)
            db.session.flush()
            for number in range(50):
                db.session.add(
                    Message(
                        conversation_id=conversation.id,
                        role=Role.USER,
                        status=Status.COMPLETE,
                        content=f"question {number}",
                    )
                )
                db.session.add(
                    Message(conversation_id=conversation.id, role=Role.ASSISTANT, status=Status.COMPLETE, content=REPLY)
                )
            db.session.commit()
            conversation_id = conversation.id
            engine = db.engine
        holds: list[float] = []
        checkouts: dict = {}

        @event.listens_for(engine, "checkout")
        def checkout(dbapi_connection, record, proxy):
            checkouts[id(record)] = time.perf_counter()

        @event.listens_for(engine, "checkin")
        def checkin(dbapi_connection, record):
            started = checkouts.pop(id(record), None)
            if started is not None:
                holds.append(time.perf_counter() - started)

        client.get(f"/c/{conversation_id}")  # warm up: templates, caches, the "last seen" write
        totals = []
        per_request = []
        for _ in range(RUNS):
            holds.clear()
            started = time.perf_counter()
            response = client.get(f"/c/{conversation_id}")
            totals.append(time.perf_counter() - started)
            assert response.status_code == 200 and response.data.count(b"<h2>") >= 50
            per_request.append(sum(holds))
        print(f"{engine.dialect.name}: {RUNS} requests of a 100-message page (50 replies of {len(REPLY)} characters)")
        print(
            f"  connection held per request: median {statistics.median(per_request) * 1000:.1f} ms, "
            f"max {max(per_request) * 1000:.1f} ms"
        )
        print(f"  whole request:               median {statistics.median(totals) * 1000:.1f} ms")
        with app.app_context():
            db.engine.dispose()
    finally:
        drop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sqlite://")
