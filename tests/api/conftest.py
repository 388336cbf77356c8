"""Fixtures of the API tests: a caller, a conversation of theirs, a bot the test controls."""

import threading

import pytest

from chatapp.chat import services, stream
from chatapp.chat.pipeline import generate_reply
from chatapp.chat.runner import get_runner


@pytest.fixture
def alice(auth):
    return auth.headers("alice")


@pytest.fixture
def conversation_url(client, alice):
    conversation = client.post("/api/v1/conversations", headers=alice, json={}).get_json()
    return f"/api/v1/conversations/{conversation['id']}"


class GatedBot:
    """Yields one chunk, then waits for the test before finishing."""

    def __init__(self, fail_with: Exception | None = None):
        self.thinking = threading.Event()
        self.go_on = threading.Event()
        self.fail_with = fail_with

    def stream(self, history, cancel=None, **options):
        self.history, self.options = history, options  # model, system_prompt
        yield "partial "
        self.thinking.set()
        if not self.go_on.wait(10):
            raise AssertionError("test never released the bot")
        if self.fail_with:
            raise self.fail_with
        yield "answer"


@pytest.fixture
def gated_bot(monkeypatch, app):
    app.config["REPLY_FLUSH_INTERVAL"] = 0  # store "partial " before the bot blocks
    bot = GatedBot()
    monkeypatch.setattr("chatapp.chat.pipeline.bot_from_config", lambda config: bot)
    return bot


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


@pytest.fixture
def progress_reads(monkeypatch):
    """Counts the database reads of a reply's progress (the stream view's and its generator's)."""
    reads = []
    read = services.read_reply_progress

    def counted(reply_id, *args):
        reads.append(reply_id)
        return read(reply_id, *args)

    monkeypatch.setattr(stream.services, "read_reply_progress", counted)
    return reads
