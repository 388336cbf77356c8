"""A new chat in the browser: an empty composer that stores nothing until the first message,
then the conversation's model and system prompt, and the model under each reply."""

import re

import pytest
import sqlalchemy as sa

from chatapp.chat.models import Conversation, Message
from chatapp.db import unit_of_work
from tests.helpers import wait_for_background_work
from tests.web.conftest import count, csrf_from


@pytest.fixture
def alice(web):
    web.register("alice")
    return web


def new_chat_form(client) -> tuple[str, str]:
    html = client.get("/chat/new").get_data(as_text=True)
    return html, csrf_from(html)


def test_new_chat_opens_a_composer_and_stores_nothing(client, app, alice):
    for _ in range(3):
        home = client.get("/").get_data(as_text=True)
        assert 'href="/chat/new">New chat</a>' in home
        html, _token = new_chat_form(client)
        assert '<h1 class="chat-title" id="chat-title">New chat</h1>' in html
        assert re.search(r'<option value=""\s+selected>echo \(default\)</option>', html), html
        assert 'name="system_prompt"' in html
    assert count(app, Conversation) == 0


def test_the_first_message_creates_the_conversation_with_its_settings(client, app, alice):
    _html, token = new_chat_form(client)
    response = client.post(
        "/chat/new",
        data={"csrf_token": token, "content": "Hello new chat", "model": "echo", "system_prompt": "Be kind."},
    )
    assert response.status_code == 302
    conversation_id = int(response.headers["Location"].rsplit("/", 1)[1])
    wait_for_background_work(app)
    with unit_of_work(app, write=False) as session:
        conversation = session.get(Conversation, conversation_id)
        assert (conversation.model, conversation.system_prompt) == ("echo", "Be kind.")
        messages = session.scalars(sa.select(Message).order_by(Message.id)).all()
        assert [(m.role.value, m.content, m.model) for m in messages] == [
            ("user", "Hello new chat", None),
            ("assistant", "Hello new chat", "echo"),
        ]
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    # The generated title (echo: the first words), and the reply's model under it.
    assert '<h1 class="chat-title" id="chat-title">Hello new chat</h1>' in html
    assert '<p class="message-model"><span class="visually-hidden">Model: </span>echo</p>' in html
    assert "Be kind.</textarea>" in html


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"content": "   "}, "Content must contain a visible character"),
        ({"content": "hi", "model": "gpt-99"}, "is not offered here; choose one of: echo"),
        ({"content": "hi", "system_prompt": "x" * 51}, "System_prompt must be 0-50 characters"),
    ],
)
def test_a_bad_first_message_shows_why_and_stores_nothing(client, app, alice, data, problem):
    app.config["SYSTEM_PROMPT_MAX_LENGTH"] = 50
    _html, token = new_chat_form(client)
    response = client.post("/chat/new", data={"csrf_token": token, **data})
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert problem in html.replace("&#39;", "'"), html
    assert count(app, Conversation) == 0 and count(app, Message) == 0


def test_the_conversation_header_changes_model_and_system_prompt(client, app, alice):
    conversation_id = alice.new_conversation()
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert f'action="/c/{conversation_id}/settings"' in html
    response = client.post(
        f"/c/{conversation_id}/settings",
        data={"csrf_token": csrf_from(html), "model": "echo", "system_prompt": "Answer in verse."},
    )
    assert response.status_code == 302
    with unit_of_work(app, write=False) as session:
        conversation = session.get(Conversation, conversation_id)
        assert (conversation.model, conversation.system_prompt) == ("echo", "Answer in verse.")
    page = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "Settings saved" in page and re.search(r'<option value="echo"\s+selected>echo \(default\)', page)

    response = client.post(
        f"/c/{conversation_id}/settings",
        data={"csrf_token": csrf_from(html), "model": "gpt-99", "system_prompt": ""},
        follow_redirects=True,
    )
    assert "is not offered here" in response.get_data(as_text=True).replace("&#39;", "'")
    with unit_of_work(app, write=False) as session:
        assert session.get(Conversation, conversation_id).system_prompt == "Answer in verse."


def test_someone_elses_conversation_settings_are_a_404(client, app, alice, auth):
    other = client.application.test_client()
    headers = auth.headers("bob")
    bobs = other.post("/api/v1/conversations", json={"system_prompt": "bob's"}, headers=headers).get_json()["id"]
    html = client.get("/chat/new").get_data(as_text=True)
    response = client.post(f"/c/{bobs}/settings", data={"csrf_token": csrf_from(html), "model": ""})
    assert response.status_code == 404
    with unit_of_work(app, write=False) as session:
        assert session.get(Conversation, bobs).system_prompt == "bob's"
