"""Pages, form errors and error pages render after the request's transaction ended
(chatapp.db.policy), and refused forms never wait for the write lock."""

from __future__ import annotations

import time

import pytest
from flask import before_render_template, template_rendered

from chatapp.chat import services as chat_services
from chatapp.chat.models import Conversation
from chatapp.db import db, unit_of_work
from chatapp.errors import InvalidInput
from chatapp.web import pages
from tests.helpers import NOTHING_HELD, transaction_state, writer_holding_the_gate
from tests.web.conftest import count, seed_reply

LONG_BUSY = {"SQLITE_BUSY_TIMEOUT_MS": 5000}
PROMPT_SECONDS = 2.0


@pytest.mark.parametrize("extra_config", [LONG_BUSY], indirect=True)
def test_refused_forms_answer_without_waiting_for_a_writer(app, client, web):
    web.register()
    conversation_id = web.new_conversation()
    conversations = count(app, Conversation)
    refused = [
        (lambda: app.test_client().post("/chat/new"), 302),  # not logged in: to the login page
        (lambda: client.post(f"/c/{conversation_id}/rename", data={"title": ""}), 422),
        (lambda: client.post(f"/c/{conversation_id}/messages", data={"content": ""}), 422),
        (lambda: client.post("/settings/tokens", data={"name": "x" * 101}), 422),
    ]
    with writer_holding_the_gate(app):
        for send, expected in refused:
            started = time.monotonic()
            response = send()
            waited = time.monotonic() - started
            assert response.status_code == expected
            assert waited < PROMPT_SECONDS, f"{response.status_code} after {waited:.1f} s"
    assert count(app, Conversation) == conversations


@pytest.fixture
def render_states(app):
    """The transaction state each template render (HTML pages) and JSON error began with."""
    states = []

    def rendering(sender, template, context, **extra):
        states.append((template.name, transaction_state()))

    before_render_template.connect(rendering, app)
    try:
        yield states
    finally:
        before_render_template.disconnect(rendering, app)


def test_form_errors_rerender_after_the_write_was_rolled_back(app, client, web, render_states, monkeypatch):
    web.register()
    conversation_id = web.new_conversation()
    render_states.clear()
    # The form's checks pass; the service then writes and refuses (as one that finds a
    # conflict half-way would): the page re-renders with the error, its write undone.
    rename = chat_services.rename_conversation

    def rename_then_refuse(conversation, title):
        rename(conversation, title)
        db.session.flush()
        raise InvalidInput("title is taken by a test", field="title")

    monkeypatch.setattr(chat_services, "rename_conversation", rename_then_refuse)
    response = client.post(f"/c/{conversation_id}/rename", data={"title": "renamed"})
    assert response.status_code == 422
    assert "title is taken by a test" in response.get_data(as_text=True).lower()
    assert render_states == [("chat/conversation.html", NOTHING_HELD)]
    with unit_of_work(app, write=False) as session:
        assert session.get(Conversation, conversation_id).title != "renamed"


def test_error_pages_render_after_the_transaction_ended(app, client, web, render_states):
    web.register()
    render_states.clear()
    # The write began, then the conversation was not found.
    assert client.post("/c/999999/delete").status_code == 404
    assert render_states == [("error.html", NOTHING_HELD)]


def test_markdown_renders_after_the_connection_went_back_to_the_pool(app, client, web, monkeypatch):
    web.register()
    conversation_id, reply_id = seed_reply(app, "alice", "q", "# Title\n\n- a\n- b")
    states = []
    render_markdown = pages.render_markdown

    def recording_render(text):
        states.append(transaction_state())
        return render_markdown(text)

    monkeypatch.setattr(pages, "render_markdown", recording_render)
    page = client.get(f"/c/{conversation_id}")
    fragment = client.get(f"/c/{conversation_id}/messages/{reply_id}")
    assert page.status_code == fragment.status_code == 200
    assert "<h3>Title</h3>" in page.get_data(as_text=True)
    assert "<h3>Title</h3>" in fragment.get_data(as_text=True)
    assert states == [NOTHING_HELD, NOTHING_HELD]


def test_pages_render_their_templates_holding_no_connection(app, client, web):
    web.register()
    seed_reply(app, "alice", "q", "answer")
    states = []

    def rendered(sender, template, context, **extra):
        states.append((template.name, transaction_state()))

    template_rendered.connect(rendered, app)
    try:
        for path in ("/", "/settings"):
            assert client.get(path).status_code == 200
    finally:
        template_rendered.disconnect(rendered, app)
    assert {name for name, _ in states} >= {"chat/index.html", "settings.html"}
    assert all(state == NOTHING_HELD for _, state in states), states
