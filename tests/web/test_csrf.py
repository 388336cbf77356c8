"""CSRF: every form and every state-changing fetch from the page needs the token (Flask-WTF)."""

import pytest

from chatapp.auth.models import ApiToken, User
from chatapp.chat.models import Conversation, Message
from tests.web.conftest import PASSWORD, count, csrf_from, seed_reply


@pytest.fixture
def extra_config():
    # The suite turns CSRF off for brevity; these tests are about it.
    return {"WTF_CSRF_ENABLED": True}


def test_anonymous_forms_need_the_token(client, app):
    for path, form in [
        ("/register", {"username": "alice", "password": PASSWORD, "confirm": PASSWORD}),
        ("/login", {"username": "alice", "password": PASSWORD}),
    ]:
        response = client.post(path, data=form)
        assert response.status_code == 400
        assert "This form has expired or did not come from this site" in response.get_data(as_text=True)
    assert count(app, User) == 0


def test_forms_work_with_the_pages_token(client, app, web):
    web.register("alice")  # takes the token from the page, as a browser would
    assert count(app, User) == 1
    assert client.get("/").status_code == 200


@pytest.fixture
def logged_in(client, app, web):
    web.register("alice")
    conversation_id, reply_id = seed_reply(app, "alice", "q", "a")
    return conversation_id, reply_id


def test_every_logged_in_form_refuses_a_missing_or_wrong_token(client, app, logged_in):
    conversation_id, reply_id = logged_in
    forms = [
        ("/chat/new", {"content": "forged"}),
        (f"/c/{conversation_id}/rename", {"title": "forged"}),
        (f"/c/{conversation_id}/delete", {}),
        (f"/c/{conversation_id}/messages", {"content": "forged"}),
        (f"/c/{conversation_id}/messages/{reply_id}/regenerate", {}),
        (f"/c/{conversation_id}/messages/{reply_id - 1}/edit", {"content": "forged"}),
        (f"/c/{conversation_id}/branch", {"message_id": reply_id}),
        ("/settings/tokens", {"name": "forged"}),
        ("/settings/sessions/1/end", {}),
        ("/settings/sessions/end-all", {}),
        ("/logout", {}),
    ]
    for path, form in forms:
        for token in (None, "not-the-token"):
            data = dict(form, csrf_token=token) if token else form
            response = client.post(path, data=data)
            assert response.status_code == 400, path
            assert "Reload the page and try again." in response.get_data(as_text=True)
    assert count(app, Conversation) == 1
    assert count(app, Message) == 2
    assert count(app, ApiToken) == 0
    assert client.get("/").status_code == 200  # still logged in: logout was refused too
    # The API's way to log out everywhere, called with the cookie, needs the header too.
    refused = client.delete("/api/v1/login-sessions")
    assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "bad_request"
    assert client.get("/").status_code == 200


def test_page_fetches_to_the_api_need_the_header(client, app, logged_in):
    conversation_id, _ = logged_in
    url = f"/api/v1/conversations/{conversation_id}/messages"
    refused = client.post(url, json={"content": "forged"})
    assert refused.status_code == 400
    assert refused.get_json()["error"]["message"] == "The CSRF token is missing."
    assert count(app, Message) == 2

    token = csrf_from(client.get(f"/c/{conversation_id}").get_data(as_text=True))
    accepted = client.post(url, json={"content": "real"}, headers={"X-CSRFToken": token})
    assert accepted.status_code == 202
    # Reads need no token.
    assert client.get(url).status_code == 200
