"""Replies on a job queue (Celery on Redis): real worker processes, a Redis of the tests' own.

The web side is the Flask test client with REPLY_QUEUE set; the replies run in
``celery --app chatapp.jobs worker`` subprocesses, and the test's Redis is a
``redis-server`` it starts (and restarts) on a free port, keeping nothing on disk.
"""

from __future__ import annotations

import shutil
import threading

import pytest
import requests

from chatapp.chat.queue import QueueReplyRunner
from chatapp.chat.runner import get_runner
from chatapp.chat.services import DEFAULT_TITLE
from tests.support.databases import stored_messages
from tests.support.load import wait_until
from tests.support.metrics import parse, total
from tests.support.queue import CeleryWorker, RedisServer
from tests.support.servers import GunicornServer
from tests.support.sse import read_reply

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]
TEXT = " ".join(f"w{n}" for n in range(20))
# Short leases, so that take-overs happen in seconds.
LEASES = {
    "REPLY_LEASE_SECONDS": 2,
    "REPLY_LEASE_RENEW_SECONDS": 0.5,
    "REPLY_STOP_CHECK_SECONDS": 0.2,
    "REPLY_SWEEP_INTERVAL": 0.5,
}


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_extra_config(redis_server) -> dict:
    redis_server.client().flushall()
    return {"REPLY_QUEUE": redis_server.url, "REPLY_QUEUE_TIMEOUT": 0.5}


@pytest.fixture
def extra_config(request, redis_extra_config) -> dict:
    return {**redis_extra_config, **getattr(request, "param", {})}


@pytest.fixture
def worker_factory(database_uri, redis_server, tmp_path):
    started: list[CeleryWorker] = []

    def start(**config) -> CeleryWorker:
        worker = CeleryWorker(database_uri, redis_server.url, tmp_path, {**LEASES, **config})
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


def post(client, headers, content: str = TEXT):
    conversation = client.post("/api/v1/conversations", json={}, headers=headers).get_json()
    response = client.post(
        f"/api/v1/conversations/{conversation['id']}/messages", json={"content": content}, headers=headers
    )
    return conversation["id"], response


def queue_depth(client) -> list[float]:
    """The web process's /metrics: the queue's depth, sampled at the scrape."""
    samples = parse(client.get("/metrics").get_data(as_text=True))
    assert total(samples, "chatapp_reply_queue_up") == 1
    return [value for name, _labels, value in samples if name == "chatapp_reply_queue_depth"]


def reply_row(database_uri: str, reply_id: int):
    return stored_messages(database_uri)[reply_id]


def wait_for_status(database_uri: str, reply_id: int, status: str, timeout: float = 30) -> None:
    assert wait_until(lambda: reply_row(database_uri, reply_id).status.value == status, timeout), reply_row(
        database_uri, reply_id
    )


def test_queue_mode_runs_replies_in_workers_only(app, client, auth, database_uri, worker_factory, redis_server):
    assert isinstance(get_runner(app), QueueReplyRunner)
    # Earlier tests' apps may have left their (idle, daemon) runner threads in this process.
    threads_before = set(threading.enumerate())
    worker = worker_factory()
    headers = auth.headers()
    conversation_id, response = post(client, headers)
    assert response.status_code == 202, response.get_json()
    reply_id = response.get_json()["reply"]["id"]
    wait_for_status(database_uri, reply_id, "complete")
    reply = reply_row(database_uri, reply_id)
    assert (reply.content, reply.error, reply.runs) == (TEXT, None, 1)
    # The conversation's title job was a Celery task the worker ran (the echo engine titles
    # a conversation with its first words).
    conversation = f"/api/v1/conversations/{conversation_id}"
    assert wait_until(lambda: client.get(conversation, headers=headers).get_json()["title"] != DEFAULT_TITLE, 20)
    assert TEXT.startswith(client.get(conversation, headers=headers).get_json()["title"])
    assert wait_until(lambda: "Task chatapp.generate_title[" in worker.log(), 10), worker.log()
    # The web process enqueued, and ran nothing: no reply, keeper or title thread started.
    started = set(threading.enumerate()) - threads_before
    assert not [thread for thread in started if thread.name in ("reply", "reply-keeper", "title")]
    assert wait_until(lambda: worker.outcomes("complete") == 1, 10), worker.log()
    samples = worker.metrics()
    assert total(samples, "chatapp_reply_queue_wait_seconds_count") == 1

    # The same job delivered again (a redelivery, a sweep's second enqueue) does nothing.
    assert get_runner(app).enqueue(reply_id)
    assert wait_until(lambda: worker.outcomes("duplicate") == 1, 10), worker.log()
    again = reply_row(database_uri, reply_id)
    assert (again.content, again.status.value, again.runs, again.attempt) == (TEXT, "complete", 1, reply.attempt)

    # The web process's /metrics samples the queue's depth: nothing waits now.
    assert queue_depth(client) == [0]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_gunicorn_streams_a_reply_a_worker_runs(database_uri, worker_factory, redis_server, tmp_path):
    # The web side as deployed: gunicorn's forked workers enqueue, and the stream they serve
    # follows the reply's progress in the database as the Celery worker writes it.
    redis_server.client().flushall()
    worker = worker_factory(BOT_ECHO_DELAY=1)
    config = {"REPLY_QUEUE": redis_server.url}
    with GunicornServer(database_uri, workers=2, threads=4, config=config, log_dir=tmp_path) as server:
        credentials = {"username": "queued", "password": "correct horse"}
        assert requests.post(server.url + "/api/v1/users", json=credentials, timeout=30).status_code == 201
        token = requests.post(server.url + "/api/v1/tokens", json=credentials, timeout=30).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        conversation = requests.post(server.url + "/api/v1/conversations", json={}, headers=headers, timeout=30)
        messages = f"{server.url}/api/v1/conversations/{conversation.json()['id']}/messages"
        posted = requests.post(messages, json={"content": TEXT}, headers=headers, timeout=30)
        assert posted.status_code == 202, posted.text
        reply_id = posted.json()["reply"]["id"]
        streamed = read_reply(None, f"{messages}/{reply_id}/stream", headers=headers)
        log = server.log()
    assert (streamed.text, streamed.status) == (TEXT, "complete"), log
    assert wait_until(lambda: worker.outcomes("complete") == 1, 10), worker.log()
    assert "taking over" not in log  # web processes do not sweep in queue mode


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_killed_worker_s_reply_completes_once_on_another(app, client, auth, database_uri, worker_factory):
    # Redis hands the killed worker's unacknowledged job out again after 3 s.
    first = worker_factory(BOT_ECHO_DELAY=4, REPLY_QUEUE_VISIBILITY_TIMEOUT=3)
    _conversation_id, response = post(client, auth.headers())
    reply_id = response.get_json()["reply"]["id"]
    assert wait_until(lambda: reply_row(database_uri, reply_id).content, 20), first.log()
    first.kill()  # SIGKILL mid-reply: no acknowledgement, no hand-over
    assert reply_row(database_uri, reply_id).status.value in ("pending", "streaming")
    second = worker_factory(BOT_ECHO_DELAY=1, REPLY_QUEUE_VISIBILITY_TIMEOUT=3)
    wait_for_status(database_uri, reply_id, "complete", 40)
    reply = reply_row(database_uri, reply_id)
    assert (reply.content, reply.error, reply.runs) == (TEXT, None, 2)
    assert wait_until(lambda: second.outcomes("complete") == 1, 10), second.log()
    # The old job came back (acks_late): it ran once (the take-over) or found the reply done.
    assert wait_until(lambda: second.outcomes("redelivered") == 1, 20), second.log()
    assert second.outcomes("complete") + second.outcomes("duplicate") == 2
    assert reply_row(database_uri, reply_id).content == TEXT


def test_redis_down_at_post_answers_503_and_writes_nothing(
    app, client, auth, database_uri, worker_factory, redis_server
):
    worker = worker_factory()
    headers = auth.headers()
    conversation_id, response = post(client, headers, "before")
    wait_for_status(database_uri, response.get_json()["reply"]["id"], "complete")
    before = stored_messages(database_uri)
    redis_server.stop()
    try:
        response = client.post(
            f"/api/v1/conversations/{conversation_id}/messages", json={"content": TEXT}, headers=headers
        )
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == "replies_unavailable"
        assert response.headers["Retry-After"]
        assert stored_messages(database_uri).keys() == before.keys()
        web = parse(client.get("/metrics").get_data(as_text=True))
        assert total(web, "chatapp_reply_queue_up") == 0
    finally:
        redis_server.start()
    # Redis is back (empty): the service recovers by itself, the worker reconnects.
    response = client.post(f"/api/v1/conversations/{conversation_id}/messages", json={"content": TEXT}, headers=headers)
    assert response.status_code == 202, response.get_json()
    reply_id = response.get_json()["reply"]["id"]
    wait_for_status(database_uri, reply_id, "complete", 40)
    assert reply_row(database_uri, reply_id).content == TEXT, worker.log()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_stopping_worker_hands_its_reply_over(app, client, auth, database_uri, worker_factory):
    first = worker_factory(BOT_ECHO_DELAY=20, REPLY_HANDOVER_SECONDS=0.5)
    _conversation_id, response = post(client, auth.headers())
    reply_id = response.get_json()["reply"]["id"]
    assert wait_until(lambda: reply_row(database_uri, reply_id).content, 20), first.log()
    attempt = reply_row(database_uri, reply_id).attempt
    first.stop()  # TERM: a warm shutdown, which would wait 20 s for the reply without the hand-over
    assert first.process.returncode == 0, first.log()
    second = worker_factory(BOT_ECHO_DELAY=1)
    wait_for_status(database_uri, reply_id, "complete", 30)
    reply = reply_row(database_uri, reply_id)
    # A new attempt from empty text; the handed-over run does not count.
    assert (reply.content, reply.error, reply.runs, reply.attempt) == (TEXT, None, 1, attempt + 1)
    assert wait_until(lambda: second.outcomes("complete") == 1, 10), second.log()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_lost_enqueue_is_found_by_the_sweep(app, client, auth, database_uri, worker_factory, redis_server):
    _conversation_id, response = post(client, auth.headers())
    assert response.status_code == 202
    reply_id = response.get_json()["reply"]["id"]
    assert queue_depth(client) == [1]  # no worker yet: the job waits
    redis_server.client().flushall()  # Redis restarted: the job is gone, the reply is committed
    assert queue_depth(client) == [0]
    worker = worker_factory()
    wait_for_status(database_uri, reply_id, "complete", 30)
    reply = reply_row(database_uri, reply_id)
    assert (reply.content, reply.runs) == (TEXT, 1)
    assert wait_until(lambda: worker.outcomes("complete") == 1, 10)
    assert "taking over 1 orphaned reply" in worker.log()


def test_stop_reaches_a_reply_running_in_a_worker(app, client, auth, database_uri, worker_factory):
    worker = worker_factory(BOT_ECHO_DELAY=20)
    headers = auth.headers()
    conversation_id, response = post(client, headers)
    reply_id = response.get_json()["reply"]["id"]
    assert wait_until(lambda: reply_row(database_uri, reply_id).content, 20), worker.log()
    stopped = client.post(f"/api/v1/conversations/{conversation_id}/messages/{reply_id}/stop", headers=headers)
    assert stopped.status_code == 200, stopped.get_json()
    # The worker's keeper sees the stop in the database and ends the run there.
    assert wait_until(lambda: worker.outcomes("stopped") == 1, 10), worker.log()
    reply = reply_row(database_uri, reply_id)
    assert reply.status.value == "stopped"
    assert TEXT.startswith(reply.content) and reply.content != TEXT


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize("extra_config", [{"STREAM_POLL_INTERVAL": 0.01}], indirect=True)
def test_a_stream_here_is_pushed_a_reply_a_worker_runs(
    app, client, auth, database_uri, worker_factory, redis_server, monkeypatch
):
    from chatapp.chat import reply_notices, services, stream
    from chatapp.chat.reply_notices import get_reply_notices
    from tests.support.sse import parse_events

    reads = []
    read = services.read_reply_progress
    monkeypatch.setattr(stream.services, "read_reply_progress", lambda *args: reads.append(1) or read(*args))
    notices = get_reply_notices(app)  # queue mode: on REPLY_QUEUE's Redis by default
    assert notices is not None
    notices.register(0)
    notices.unregister(0)
    assert wait_until(lambda: notices.available, 15)
    told = redis_server.client().pubsub()
    told.psubscribe(reply_notices.CHANNEL_PREFIX + "*")
    worker_factory(BOT_ECHO_DELAY=3)
    headers = auth.headers()
    conversation_id, response = post(client, headers)
    reply_id = response.get_json()["reply"]["id"]
    streamed = client.get(f"/api/v1/conversations/{conversation_id}/messages/{reply_id}/stream", headers=headers)
    events = parse_events(streamed.get_data(as_text=True))
    notices.stop()
    assert "".join(data for name, data in events if name == "message") == TEXT
    assert [data for name, data in events if name == "done"] == ['{"status": "complete", "error": null}']
    sent = []
    while (message := told.get_message(timeout=0.5)) is not None:
        if message["type"] == "pmessage":
            sent.append(message)
    told.close()
    # The worker told each write; the stream read once per notice (plus its first read and the
    # one after subscribing), where polling every 10 ms over the bot's 3 s reads ~300 times.
    assert sent and len(reads) <= len(sent) + 2, (len(reads), len(sent))


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_started_while_redis_is_down_the_service_recovers_by_itself(database_uri, tmp_path):
    # Web processes and a reply worker start while nothing listens at the queue's address
    # (Redis rebooting with the hosts, say): neither crashes nor loops, reads are served, a
    # new message is a 503 that saves nothing, and once Redis is up everything works.
    redis_server = RedisServer()  # its port chosen; not started yet
    worker = CeleryWorker(database_uri, redis_server.url, tmp_path, LEASES)
    config = {"REPLY_QUEUE": redis_server.url, "RATELIMIT_ENABLED": "true"}
    try:
        worker.start(wait=False)
        with GunicornServer(database_uri, workers=1, threads=4, config=config, log_dir=tmp_path) as server:
            credentials = {"username": "early", "password": "correct horse"}
            # Rate limited, and the limits' Redis is down: counted in memory, not a 500.
            assert requests.post(server.url + "/api/v1/users", json=credentials, timeout=30).status_code == 201
            token = requests.post(server.url + "/api/v1/tokens", json=credentials, timeout=30).json()["token"]
            headers = {"Authorization": f"Bearer {token}"}
            conversations = server.url + "/api/v1/conversations"
            created = requests.post(conversations, json={}, headers=headers, timeout=30)
            assert created.status_code == 201, created.text
            messages = f"{conversations}/{created.json()['id']}/messages"
            assert requests.get(conversations, headers=headers, timeout=30).status_code == 200
            # Readiness is the database's: a load balancer keeps serving reads.
            assert requests.get(server.url + "/readyz", timeout=30).status_code == 200
            refused = requests.post(messages, json={"content": TEXT}, headers=headers, timeout=30)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "replies_unavailable"
            assert requests.get(messages, headers=headers, timeout=30).json()["items"] == []
            assert wait_until(lambda: "Cannot connect to redis" in worker.log(), 30), worker.log()
            assert worker.process.poll() is None, worker.log()

            redis_server.start()
            posted = requests.post(messages, json={"content": TEXT}, headers=headers, timeout=30)
            assert posted.status_code == 202, posted.text
            streamed = read_reply(None, f"{messages}/{posted.json()['reply']['id']}/stream", headers=headers)
            log = server.log_text()
        assert (streamed.text, streamed.status) == (TEXT, "complete"), worker.log()
        assert "the reply queue (Redis) is unreachable" in log
        assert "this process counts limits in its own memory" in log
        assert worker.process.poll() is None, worker.log()
    finally:
        worker.stop()
        redis_server.stop()
