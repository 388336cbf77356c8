"""The pressure scenario under real gunicorn: a slow bot never starves the pool.

pool_size=2, max_overflow=0, pool_timeout=2 and a 3 s echo bot: if any request or reply
held a connection while the bot thinks, the other requests would wait 2 s for one and
get 503s. Timings are measured by bench/pressure.py, not asserted here.
"""

import time

import pytest

from tests.support import metrics
from tests.support.databases import migrate
from tests.support.pressure import abandon_streams, run_pressure
from tests.support.servers import GunicornServer

pytestmark = pytest.mark.slow

POOL = {
    "SQLALCHEMY_ENGINE_OPTIONS__pool_size": 2,
    "SQLALCHEMY_ENGINE_OPTIONS__max_overflow": 0,
    "SQLALCHEMY_ENGINE_OPTIONS__pool_timeout": 2,
    "BOT_ECHO_DELAY": 3,
}


@pytest.fixture
def server_database(backend, request, tmp_path):
    if backend == "sqlite":
        uri = f"sqlite:///{tmp_path / 'pressure.sqlite'}"
        migrate(uri)
        return uri, None
    database = request.getfixturevalue("postgres_database")
    return database.url, database


def pool_checked_out(server) -> list[float]:
    """The per-worker 'checked out' pool gauges from /metrics."""
    return list(metrics.by_label(metrics.scrape(server.url), "chatapp_db_pool_checked_out", "pid").values())


def test_forty_slow_chats_with_a_two_connection_pool(server_database, tmp_path):
    uri, postgres = server_database
    with GunicornServer(uri, workers=2, threads=8, config=POOL, log_dir=tmp_path) as server:
        figures = run_pressure(server.url, chats=40)
        assert figures["errors"] == [], server.log()
        assert figures["complete"] == 40
        assert figures["get_count"] > 0

        left = abandon_streams(server.url, figures["client"], figures["conversation_ids"], readers=200)
        assert left == 200
        # Let every abandoned generator notice its closed socket and every reply finish.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listing = (
                figures["client"]
                .http.get(f"{server.url}/api/v1/conversations/{figures['conversation_ids'][-1]}/messages", timeout=10)
                .json()["items"]
            )
            if listing and listing[-1]["status"] == "complete":
                break
            time.sleep(0.5)
        time.sleep(1.5)
        assert "Traceback" not in server.log()
        if postgres is not None:
            assert postgres.backends_in_state("idle in transaction") == []
            assert postgres.backends_in_state("idle in transaction (aborted)") == []
        # The reaper's periodic pass may hold a connection for a moment; a leak holds it for good.
        deadline = time.monotonic() + 10
        while True:
            gauges = pool_checked_out(server)
            if (gauges and all(value == 0 for value in gauges)) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert gauges and all(value == 0 for value in gauges), gauges
