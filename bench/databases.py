"""The database of a benchmark run (a SQLite file, or a PostgreSQL database created for the
run and dropped after it), and the rows every benchmarked app reads."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from bench.lifecycle import on_exit
from tests.support.databases import PostgresDatabase, migrate, postgres_base_url, postgres_unreachable

PG_URL_VARS = ("CHATAPP_BENCH_POSTGRES_URL", "CHATAPP_TEST_DATABASE_URL")
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PASSWORD = "bench-password"


def bench_postgres_url() -> str:
    """The PostgreSQL server the benchmarks create their databases on."""
    return postgres_base_url(*PG_URL_VARS, default=PG_DEFAULT)


def backends(requested: list[str]) -> list[str]:
    """The backends to run; PostgreSQL is left out (with a note) when it cannot be reached."""
    chosen = []
    for backend in requested:
        if backend == "postgresql":
            why = postgres_unreachable(bench_postgres_url(), timeout=3)
            if why is not None:
                print(f"# PostgreSQL at {bench_postgres_url()} unreachable ({why}); skipping it", flush=True)
                continue
        chosen.append(backend)
    return chosen


class Database:
    """A migrated, empty chatapp database for one benchmark: a SQLite file in ``workdir`` or a
    PostgreSQL database ``chatapp_bench_<pid>_<hex>``."""

    def __init__(self, backend: str, workdir: Path):
        self.backend = backend
        self.postgres: PostgresDatabase | None = None
        if backend == "sqlite":
            self.uri = f"sqlite:///{workdir / f'bench-{secrets.token_hex(3)}.sqlite'}"
        elif backend == "postgresql":
            self.postgres = PostgresDatabase(bench_postgres_url(), prefix="chatapp_bench")
            self.uri = self.postgres.url
        else:
            raise ValueError(backend)

    @property
    def name(self) -> str | None:
        """The PostgreSQL database's name; None on SQLite."""
        return self.postgres.name if self.postgres else None

    def __enter__(self) -> Database:
        if self.postgres:
            self.postgres.create()
            on_exit(self.drop)
        migrate(self.uri)
        return self

    def __exit__(self, *exc) -> None:
        self.drop()

    def drop(self) -> None:
        if self.postgres:
            self.postgres.drop()

    def pg_states(self) -> dict[str, int]:
        """pg_stat_activity states of the connections to this database (PostgreSQL only)."""
        return self.postgres.states() if self.postgres else {}


@dataclass
class Seeded:
    token: str
    user_id: int
    conversation_ids: list[int]


def seed(database_uri: str, *, conversations: int, messages: int = 0, username: str = "bench") -> Seeded:
    """One user, one API token, ``conversations`` conversations; ``messages`` complete
    messages (alternating user/assistant) in the first one. Written with chatapp's own
    services, in this process, so every app benchmarked reads the same rows."""
    from chatapp import create_app
    from chatapp.auth import services as auth
    from chatapp.chat import services as chat
    from chatapp.chat.models import Message, Role, Status
    from chatapp.db import db, unit_of_work, utcnow

    app = create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "bench",
            "SQLALCHEMY_DATABASE_URI": database_uri,
            "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000",
            "REPLY_SWEEP_INTERVAL": 0,
            "RATELIMIT_ENABLED": False,
        }
    )
    try:
        with unit_of_work(app):
            user = auth.create_user(username, PASSWORD)
            _row, token = auth.create_token(user.id, name="bench")
            ids = [chat.create_conversation(user.id, f"bench {i}").id for i in range(conversations)]
            user_id = user.id
        if messages and ids:
            with unit_of_work(app) as session:
                now = utcnow()
                session.add_all(
                    [
                        Message(
                            conversation_id=ids[0],
                            role=Role.USER if i % 2 == 0 else Role.ASSISTANT,
                            content=f"message {i}: the quick brown fox jumps over the lazy dog",
                            status=Status.COMPLETE,
                            created_at=now,
                            updated_at=now,
                        )
                        for i in range(messages)
                    ]
                )
                session.flush()
                link_as_one_branch(session, ids[0])
    finally:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()
    return Seeded(token, user_id, ids)


def link_as_one_branch(session, conversation_id: int) -> None:
    """Make a conversation's messages one branch in id order, ending at the last (messages
    form a tree: each follows its parent_id, and the conversation shows its current leaf)."""
    import sqlalchemy as sa

    params = {"c": conversation_id}
    session.execute(
        sa.text(
            "UPDATE messages SET parent_id = (SELECT max(p.id) FROM messages p "
            "WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id) "
            "WHERE conversation_id = :c"
        ),
        params,
    )
    session.execute(
        sa.text(
            "UPDATE conversations SET current_leaf_id = (SELECT max(id) FROM messages WHERE conversation_id = :c) "
            "WHERE id = :c"
        ),
        params,
    )
