"""Fixtures of the API tests: a caller, a conversation of theirs, a bot the test controls."""

import threading

import pytest


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
