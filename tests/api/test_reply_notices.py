"""Streams whose reply runs elsewhere wait for Redis notices instead of polling; the first text is stored at once."""

import json
import logging
import threading

import pytest

from chatapp.chat import reply_notices, stream
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
def publishes(monkeypatch, notices):
    sent = []
    publish = notices.publish

    def counted(reply_id, attempt, length, status, **chunk):
        sent.append((reply_id, status))
        publish(reply_id, attempt, length, status, **chunk)

    monkeypatch.setattr(notices, "publish", counted)
    return sent


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
    client, app, alice, conversation_url, notices, gated_bot, no_rereads, progress_reads, elsewhere
):
    # No safety re-check within the test: only the stop's notice can end the stream.
    connected(notices)
    reply_id = post(client, alice, conversation_url)
    assert gated_bot.thinking.wait(10)
    subscribed(notices, reply_id)
    events = reply_events(app, reply_id)
    assert next(events).startswith("retry:")
    assert "partial" in next(events)
    finished = []
    reader = threading.Thread(target=lambda: finished.extend(events))
    reader.start()
    assert wait_until(lambda: len(progress_reads) == 1, 10)
    reads = len(progress_reads)
    response = client.post(f"{conversation_url}/messages/{reply_id}/stop", headers=alice)
    assert response.status_code == 200
    reader.join(30)  # a bound for a loaded machine; without the notice it would wait 120 s
    assert not reader.is_alive()
    assert len(progress_reads) == reads == 1  # the notice said it all
    notices.unregister(reply_id)
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
    assert messages[0] == {
        "reply": reply_id,
        "length": len("partial "),
        "start": 0,
        "text": "partial ",
        "status": "streaming",
        "error": None,
    }
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


@pytest.fixture
def held(app, monkeypatch):
    """Replies that run elsewhere, started only when the test says so."""
    threads = []

    def submit_held(reply_id, reservation=None):
        threads.append(threading.Thread(target=generate_reply, args=(app, reply_id)))

    monkeypatch.setattr(get_runner(app), "submit", submit_held)
    yield threads
    for thread in threads:
        if thread.is_alive():
            thread.join(10)


@pytest.fixture
def no_rereads(monkeypatch):
    """No timed re-read within a test: every read left is one the notices asked for."""
    for name in ("NOTICE_SAFETY_SECONDS", "LIVE_RECHECK_SECONDS"):
        monkeypatch.setattr(stream, name, 120.0)


def subscribed(notices, reply_id):
    """This process subscribed to ``reply_id`` before its stream reads: no read after the
    confirmation, so every read a test counts is one the stream chose."""
    notices.register(reply_id)
    assert wait_until(lambda: notices.confirmed(reply_id), 15)


def stream_when_subscribed(app, notices, reply_id, run):
    """Stream ``reply_id`` in a thread, its process subscribed first; start its run; its events."""
    subscribed(notices, reply_id)
    events = []
    reader = threading.Thread(target=lambda: events.extend(reply_events(app, reply_id)))
    reader.start()
    run.start()
    reader.join(60)  # a bound for a loaded machine; the reply takes about a second
    assert not reader.is_alive()
    run.join(10)
    notices.unregister(reply_id)
    parsed = parse_events("".join(events))
    return [data for name, data in parsed if name == "message"], [data for name, data in parsed if name == "done"]


def test_a_stream_elsewhere_takes_the_text_from_the_notices_with_one_read(
    client, app, alice, conversation_url, notices, no_rereads, progress_reads, publishes, held
):
    connected(notices)
    reply_id = post(client, alice, conversation_url, CONTENT)
    deltas, done = stream_when_subscribed(app, notices, reply_id, held[0])
    assert "".join(deltas) == CONTENT == reply_row(app, reply_id)[1]
    assert len(deltas) >= 3, deltas  # pushed in several steps, not only at the end
    assert done == ['{"status": "complete", "error": null}']
    assert len(publishes) >= 3 and publishes[-1] == (reply_id, "complete")
    # The stream's first read (the view's, when it passes one), then none per chunk.
    assert progress_reads == [reply_id]


def test_a_missed_notice_is_made_good_by_one_read(
    client, app, alice, conversation_url, notices, no_rereads, progress_reads, publishes, held, monkeypatch
):
    connected(notices)
    received = notices._received
    seen = []

    def drop_the_second(reply_id, data):
        seen.append(data)
        if len(seen) != 2:
            received(reply_id, data)

    monkeypatch.setattr(notices, "_received", drop_the_second)
    reply_id = post(client, alice, conversation_url, CONTENT)
    deltas, done = stream_when_subscribed(app, notices, reply_id, held[0])
    assert len(seen) >= 3, seen  # a notice came after the dropped one
    # Nothing repeated, nothing missing: the gap was read from the database.
    assert "".join(deltas) == CONTENT == reply_row(app, reply_id)[1]
    assert done == ['{"status": "complete", "error": null}']
    assert progress_reads == [reply_id, reply_id]


def notice(reply_id, attempt, start, text, status="streaming", error=None):
    fields = {"reply": reply_id, "attempt": attempt, "length": start + len(text or ""), "status": status}
    if text is not None:
        fields.update(start=start, text=text, error=error)
    return json.dumps(fields)


def test_taking_chunks_from_notices(notices):
    """Only a run that continues a stream's text exactly is taken; anything else asks for a read."""
    connected(notices)
    notices.register(7)
    try:
        version, progress, whole = notices.take(7, 1, 0, 0)
        assert progress is None  # nothing received: read
        notices._received(7, notice(7, 1, 0, "héllo "))
        notices._received(7, notice(7, 1, 6, "wörld"))
        version, progress, whole = notices.take(7, 1, 0, 0)
        assert progress == {"attempt": 1, "delta": "héllo wörld", "status": "streaming", "error": None} and whole
        # From the middle of the run (a read brought the first chunk): only the rest.
        assert notices.take(7, 1, 6, 0)[1]["delta"] == "wörld"
        # A gap (a notice missed): nothing to take.
        notices._received(7, notice(7, 1, 20, "later"))
        assert notices.take(7, 1, 11, version)[1] is None
        # Another attempt (a takeover started over): read, which resets the stream.
        version = notices.version(7)
        notices._received(7, notice(7, 2, 0, "again"))
        assert notices.take(7, 1, 25, version)[1] is None
        # A run, then a chunk of another attempt: the run now, and a read next.
        version = notices.version(7)
        notices._received(7, notice(7, 2, 5, " and", "failed", "the bot failed"))
        notices._received(7, notice(7, 3, 0, "third"))
        _, progress, whole = notices.take(7, 2, 5, version)
        assert progress == {"attempt": 2, "delta": " and", "status": "failed", "error": "the bot failed"}
        assert not whole
        # A notice without text (a chunk too long to carry), or malformed: read.
        version = notices.version(7)
        notices._received(7, notice(7, 3, 5, None))
        assert notices.take(7, 3, 5, version)[1] is None
        version = notices.version(7)
        notices._received(7, b"{not json")
        notices._received(7, json.dumps({"reply": 7, "attempt": 3, "length": 1, "status": "streaming", "text": 5}))
        assert notices.take(7, 3, 5, version)[1] is None
        # A stop at the stream's offset ends it with no text.
        version = notices.version(7)
        notices._received(7, notice(7, 3, 5, "", "stopped"))
        assert notices.take(7, 3, 5, version)[1] == {"attempt": 3, "delta": "", "status": "stopped", "error": None}
        # Fallen behind the chunks kept: read.
        version = notices.version(7)
        for start in range(reply_notices.CHUNKS_KEPT + 1):
            notices._received(7, notice(7, 4, start, "x"))
        assert notices.take(7, 4, 0, version)[1] is None
        assert notices.take(7, 4, 1, version + 1)[1]["delta"] == "x" * reply_notices.CHUNKS_KEPT
    finally:
        notices.unregister(7)


def test_a_long_chunk_is_published_without_its_text(notices, redis_server, monkeypatch):
    monkeypatch.setattr(reply_notices, "NOTICE_TEXT_MAX_CHARS", 4)
    connected(notices)
    subscriber = redis_server.client().pubsub()
    subscriber.subscribe(reply_notices.channel(9))
    assert subscriber.get_message(timeout=10)["type"] == "subscribe"
    notices.publish(9, 1, 9, "streaming", text="😀 ok")
    notices.publish(9, 1, 14, "streaming", text="12345")
    messages = []
    wait_until(lambda: _received_plain(subscriber, messages) and len(messages) == 2, 10)
    assert messages == [
        {"reply": 9, "attempt": 1, "length": 9, "start": 5, "text": "😀 ok", "status": "streaming", "error": None},
        {"reply": 9, "attempt": 1, "length": 14, "status": "streaming", "error": None},
    ]
    subscriber.close()


def _received_plain(subscriber, messages) -> bool:
    message = subscriber.get_message(timeout=0.1)
    if message and message["type"] == "message":
        messages.append(json.loads(message["data"]))
    return True
