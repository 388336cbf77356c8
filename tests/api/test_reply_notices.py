"""Streams whose reply runs elsewhere wait for Redis notices instead of polling; the first text is stored at once."""

import json
import logging
import threading

import pytest

from chatapp.chat import reply_notices, services, stream
from chatapp.chat.pipeline import generate_reply
from chatapp.chat.reply_notices import get_reply_notices
from chatapp.chat.runner import get_runner
from chatapp.chat.stream import reply_events
from tests.api.test_pipeline import post, reply_row
from tests.helpers import wait_for_background_work
from tests.support.load import wait_until
from tests.support.queue import RedisServer
from tests.support.sse import parse_events

CONTENT = "one two three four five six seven eight"
# Polling every 10 ms over the bot's 0.6 s would read the database about 60 times.
PUSH_CONFIG = {"BOT_ECHO_DELAY": 0.6, "REPLY_FLUSH_INTERVAL": 0.1, "STREAM_POLL_INTERVAL": 0.01}


@pytest.fixture
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def extra_config(redis_server):
    return {**PUSH_CONFIG, "REPLY_EVENTS": redis_server.url}


@pytest.fixture
def notices(app):
    notices = get_reply_notices(app)
    assert notices is not None
    yield notices
    notices.stop()


def connected(notices):
    """Start the process's subscriber and wait until it is connected (else streams poll)."""
    notices.register(0)
    notices.unregister(0)
    assert wait_until(lambda: notices.available and notices.publish_ready(), 15)


@pytest.fixture
def progress_reads(monkeypatch):
    reads = []
    read = services.read_reply_progress

    def counted(reply_id, *args):
        reads.append(reply_id)
        return read(reply_id, *args)

    monkeypatch.setattr(stream.services, "read_reply_progress", counted)
    return reads


@pytest.fixture
def publishes(monkeypatch, notices):
    sent = []
    publish = notices.publish

    def counted(reply_id, attempt, length, status):
        sent.append((reply_id, status))
        publish(reply_id, attempt, length, status)

    monkeypatch.setattr(notices, "publish", counted)
    return sent


@pytest.fixture
def elsewhere(app, monkeypatch):
    """Replies run outside this process's live state, as in a queue worker or another gunicorn worker."""
    threads = []

    def submit_elsewhere(reply_id, reservation=None):
        threads.append(threading.Thread(target=generate_reply, args=(app, reply_id)))
        threads[-1].start()

    monkeypatch.setattr(get_runner(app), "submit", submit_elsewhere)
    yield threads
    for thread in threads:
        thread.join(10)


def stream_all(app, reply_id, on_first_delta=None):
    deltas, done = [], []
    for event in reply_events(app, reply_id):
        for name, data in parse_events(event):
            if name == "message":
                deltas.append(data)
                if on_first_delta is not None and len(deltas) == 1:
                    on_first_delta()
            elif name == "done":
                done.append(data)
    return deltas, done


def test_a_stream_whose_reply_runs_elsewhere_reads_once_per_notice(
    client, app, alice, conversation_url, notices, progress_reads, publishes, elsewhere
):
    connected(notices)
    reply_id = post(client, alice, conversation_url, CONTENT)
    deltas, done = stream_all(app, reply_id)
    elsewhere[0].join(10)
    assert "".join(deltas) == CONTENT == reply_row(app, reply_id)[1]
    assert len(deltas) >= 3, deltas  # pushed in several steps, not only at the end
    assert done == ['{"status": "complete", "error": null}']
    # One read per stored write at most, plus the first read and the one after the
    # subscription is confirmed; polling would have read about 60 times.
    assert publishes and publishes[-1] == (reply_id, "complete")
    assert len(progress_reads) <= len(publishes) + 2, (progress_reads, publishes)


def test_a_stop_reaches_a_stream_elsewhere_through_a_notice(
    client, app, alice, conversation_url, notices, gated_bot, monkeypatch, progress_reads, elsewhere
):
    # No safety re-check within the test: only the stop's notice can end the stream.
    monkeypatch.setattr(stream, "NOTICE_SAFETY_SECONDS", 60.0)
    monkeypatch.setattr(stream, "LIVE_RECHECK_SECONDS", 60.0)
    connected(notices)
    reply_id = post(client, alice, conversation_url)
    assert gated_bot.thinking.wait(10)
    events = reply_events(app, reply_id)
    assert next(events).startswith("retry:")
    assert "partial" in next(events)
    finished = []
    reader = threading.Thread(target=lambda: finished.extend(events))
    reader.start()
    # Stop once the stream waits subscribed: its subscription confirmed (which wakes it to
    # read once more, unless that came before its first read).
    assert wait_until(lambda: notices.version(reply_id) > 0, 10)
    wait_until(lambda: len(progress_reads) >= 2, 1)
    response = client.post(f"{conversation_url}/messages/{reply_id}/stop", headers=alice)
    assert response.status_code == 200
    reader.join(30)  # a bound for a loaded machine; without the notice it would wait 60 s
    assert not reader.is_alive()
    gated_bot.go_on.set()
    assert [data for name, data in parse_events("".join(finished)) if name == "done"] == [
        '{"status": "stopped", "error": null}'
    ]


def test_the_first_chunk_is_stored_and_told_at_once(
    client, app, alice, conversation_url, notices, redis_server, gated_bot
):
    app.config["REPLY_FLUSH_INTERVAL"] = 60.0  # later text waits; the first may not
    subscriber = redis_server.client().pubsub()
    subscriber.psubscribe(reply_notices.CHANNEL_PREFIX + "*")
    reply_id = post(client, alice, conversation_url)
    # The bot has sent one chunk and is blocked on the gate: the chunk is already stored.
    assert gated_bot.thinking.wait(10)
    assert wait_until(lambda: reply_row(app, reply_id)[1] == "partial ", 10)
    assert not gated_bot.go_on.is_set()
    messages = []
    wait_until(lambda: _received(subscriber, messages), 10)
    attempt = messages[0].pop("attempt")
    assert messages[0] == {"reply": reply_id, "length": len("partial "), "status": "streaming"}
    assert isinstance(attempt, int)
    gated_bot.go_on.set()
    wait_for_background_work(app)
    assert reply_row(app, reply_id)[1] == "partial answer"
    subscriber.close()


def _received(subscriber, messages) -> bool:
    message = subscriber.get_message(timeout=0.1)
    if message and message["type"] == "pmessage":
        messages.append(json.loads(message["data"]))
    return bool(messages)


def test_redis_lost_mid_stream_falls_back_to_polling_and_push_resumes(
    client, app, alice, conversation_url, notices, redis_server, progress_reads, publishes, elsewhere, caplog
):
    connected(notices)
    caplog.set_level(logging.ERROR, logger=reply_notices.__name__)
    reply_id = post(client, alice, conversation_url, CONTENT)
    # Redis dies after the first text reached the stream: the rest still arrives (polling).
    deltas, done = stream_all(app, reply_id, on_first_delta=redis_server.stop)
    assert "".join(deltas) == CONTENT and done == ['{"status": "complete", "error": null}']
    assert "Redis is unreachable" in caplog.text
    elsewhere[0].join(10)

    redis_server.start()  # the same port: the process finds it again by itself
    assert wait_until(lambda: notices.available and notices.publish_ready(), 15)
    progress_reads.clear()
    publishes.clear()
    reply_id = post(client, alice, conversation_url, CONTENT)
    deltas, done = stream_all(app, reply_id)
    assert "".join(deltas) == CONTENT and done == ['{"status": "complete", "error": null}']
    assert publishes and len(progress_reads) <= len(publishes) + 2, (progress_reads, publishes)
