"""A reply reads the same while it streams as once it has finished: the page shows its text so
far rendered by the server (``/c/<id>/messages/<reply_id>/text``), sanitized, after the read ended."""

from __future__ import annotations

import html as html_module
import re

import pytest

from chatapp.chat import services as chat_services
from chatapp.chat.models import Message
from chatapp.db import unit_of_work
from chatapp.web import pages
from chatapp.web.markdown import render_markdown, render_streaming_markdown
from tests.helpers import NOTHING_HELD, transaction_state
from tests.web.conftest import seed_reply

SO_FAR = "# Plan\n\nFirst **bo"
XSS = '<script>alert(1)</script> <span class="admin-only">x</span>'


@pytest.fixture
def alice(web):
    web.register("alice")
    return web


def streaming_reply(app, text: str) -> tuple[int, int]:
    """A reply being written, with ``text`` stored so far."""
    conversation_id, reply_id = seed_reply(app, "alice", "q", "", finish=False)
    with unit_of_work(app) as session:
        attempt = session.get(Message, reply_id).attempt
        assert chat_services.append_to_reply(reply_id, attempt, text)
    return conversation_id, reply_id


def test_the_text_so_far_renders_as_the_finished_reply_will(app, client, alice):
    conversation_id, reply_id = streaming_reply(app, SO_FAR)
    response = client.get(f"/c/{conversation_id}/messages/{reply_id}/text")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_data(as_text=True)
    # The open "**" is closed for it: bold now, not "**bo" until the reply ends.
    assert body == "<h3>Plan</h3>\n<p>First <strong>bo</strong></p>"
    assert body == render_streaming_markdown(SO_FAR)


def test_a_reloaded_page_shows_the_text_so_far_rendered(app, client, alice):
    conversation_id, reply_id = streaming_reply(app, SO_FAR)
    page = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert '<div class="text markdown streaming"><h3>Plan</h3>\n<p>First <strong>bo</strong></p></div>' in page
    assert re.search(rf'id="message-{reply_id}"\s+data-message-id="{reply_id}" data-status="streaming"', page)
    # Still "being written": no Regenerate, and "thinking" hidden now that there is text.
    assert "Regenerate" not in page
    assert '<p class="thinking" hidden>' in page


def test_a_finished_reply_renders_in_full_and_keeps_its_markdown_for_copy(app, client, alice):
    answer = "Done: **yes**\n\n```python\nx = '<b>'\n```"
    conversation_id, reply_id = seed_reply(app, "alice", "q", answer)
    body = client.get(f"/c/{conversation_id}/messages/{reply_id}/text").get_data(as_text=True)
    assert body == render_markdown(answer)
    fragment = client.get(f"/c/{conversation_id}/messages/{reply_id}").get_data(as_text=True)
    raw = re.search(r'data-copy-message[^>]*data-raw="([^"]*)"', fragment).group(1)
    assert html_module.unescape(raw) == answer
    assert '<span class="code-lang">python</span>' in fragment


def test_markup_in_a_reply_being_written_stays_text(app, client, alice):
    conversation_id, reply_id = streaming_reply(app, XSS)
    body = client.get(f"/c/{conversation_id}/messages/{reply_id}/text").get_data(as_text=True)
    assert "<script" not in body and "<span" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body


def test_only_the_owners_replies(app, client, web):
    web.register("alice")
    conversation_id, reply_id = streaming_reply(app, "private words")
    assert client.get(f"/c/{conversation_id}/messages/{reply_id - 1}/text").status_code == 404  # a user message
    assert client.get(f"/c/{conversation_id}/messages/{reply_id + 99}/text").status_code == 404
    web.logout()
    logged_out = client.get(f"/c/{conversation_id}/messages/{reply_id}/text")
    assert logged_out.status_code == 302 and "/login" in logged_out.headers["Location"]
    web.register("bob")
    response = client.get(f"/c/{conversation_id}/messages/{reply_id}/text")
    assert response.status_code == 404
    assert "private words" not in response.get_data(as_text=True)


def test_the_text_so_far_renders_after_the_connection_went_back(app, client, alice, monkeypatch):
    conversation_id, reply_id = streaming_reply(app, SO_FAR)
    finished_id, finished_reply = seed_reply(app, "alice", "q", "# Done")
    states = []

    def recording(render):
        def wrapped(text):
            states.append(transaction_state())
            return render(text)

        return wrapped

    monkeypatch.setattr(pages, "render_streaming_markdown", recording(pages.render_streaming_markdown))
    monkeypatch.setattr(pages, "render_markdown", recording(pages.render_markdown))
    assert client.get(f"/c/{conversation_id}/messages/{reply_id}/text").status_code == 200
    assert client.get(f"/c/{finished_id}/messages/{finished_reply}/text").status_code == 200
    assert client.get(f"/c/{conversation_id}").status_code == 200
    assert states == [NOTHING_HELD] * 3
