"""In queue mode the rate limits count in the queue's Redis by default, shared by every process.

Flask-Limiter keeps one storage per process (its extension object), so the two "hosts"
here are two apps made one after the other: the second sees the first's count only if
the count lives in Redis. A Redis that is down leaves each process counting in memory.
"""

from __future__ import annotations

import logging
import shutil

import pytest

from chatapp import create_app
from chatapp.db import db
from tests.conftest import base_test_config
from tests.helpers import AuthActions
from tests.support.queue import RedisServer
from tests.support.servers import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
LIMITS = {"RATELIMIT_ENABLED": True, "RATELIMIT_CONVERSATIONS": "3 per minute", "REPLY_QUEUE_TIMEOUT": 0.3}


@pytest.fixture
def make_app(database_uri, tmp_path):
    made = []

    def make(config: dict):
        app = create_app({**base_test_config(database_uri), **LIMITS, "REPLY_EVENTS": "off", **config})
        app.instance_path = str(tmp_path / "instance")
        made.append(app)
        return app

    yield make
    for app in made:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()


def new_conversations(app, headers, n: int) -> list[int]:
    client = app.test_client()
    return [client.post("/api/v1/conversations", json={}, headers=headers).status_code for _ in range(n)]


@pytest.mark.parametrize("explicit_memory", [False, True])
def test_two_apps_on_one_queue_share_one_count(make_app, explicit_memory):
    redis_server = RedisServer()
    redis_server.start()
    try:
        config = {"REPLY_QUEUE": redis_server.url}
        if explicit_memory:
            config["RATELIMIT_STORAGE_URI"] = "memory://"  # an explicit choice still wins
        one = make_app(config)
        assert one.config["RATELIMIT_STORAGE_URI"] == ("memory://" if explicit_memory else redis_server.url)
        headers = AuthActions(one.test_client()).headers("shared")
        statuses = new_conversations(one, headers, 2)
        two = make_app(config)
        statuses += new_conversations(two, headers, 2)
        keys = [key.decode() for key in redis_server.client().scan_iter()]
    finally:
        redis_server.stop()
    if explicit_memory:
        assert statuses == [201] * 4  # each app counted alone
        assert not [key for key in keys if key.startswith("LIMITS:")]
    else:
        assert statuses == [201, 201, 201, 429]
        assert [key for key in keys if key.startswith("LIMITS:")]


def test_a_queue_redis_that_is_down_leaves_limits_counting_in_memory(make_app, caplog):
    app = make_app({"REPLY_QUEUE": f"redis://127.0.0.1:{free_port()}/0"})  # nothing listens there
    headers = AuthActions(app.test_client()).headers("no-redis")
    with caplog.at_level(logging.WARNING):
        statuses = new_conversations(app, headers, 4)
    # Neither failed (500) nor let through unlimited, and the log says why.
    assert statuses == [201, 201, 201, 429]
    assert "this process counts limits in its own memory" in caplog.text
