"""Input limits come from the app's config, and the API, the web forms and the services agree on
them: a value at a limit is accepted everywhere, one past it refused everywhere, in the same words."""

from __future__ import annotations

import pytest
from markupsafe import escape

from chatapp import create_app
from chatapp.auth import services as auth_services
from chatapp.chat import services as chat_services
from chatapp.config import ConfigError
from chatapp.errors import InvalidInput
from chatapp.web.forms import sentence
from tests.conftest import base_test_config
from tests.helpers import start_conversation

# Limits unlike the defaults, so that nothing passes by falling back on them.
LIMITS = {
    "USERNAME_MIN_LENGTH": 2,
    "USERNAME_MAX_LENGTH": 8,
    "PASSWORD_MIN_LENGTH": 6,
    "PASSWORD_MAX_LENGTH": 14,
    "TITLE_MAX_LENGTH": 10,
    "MESSAGE_MAX_LENGTH": 50,
    "TOKEN_NAME_MAX_LENGTH": 5,
}
with_limits = pytest.mark.parametrize("extra_config", [LIMITS], indirect=True)


def api_problem(response, field: str) -> str:
    """What the API says is wrong with the field: its message without "field '<name>': "."""
    assert response.status_code == 422, response.get_data(as_text=True)[:300]
    message = response.get_json()["error"]["message"]
    prefix = f"field '{field}': "
    assert message.startswith(prefix), message
    return message[len(prefix) :]


def web_says(response, field: str, problem: str) -> None:
    """The page shows the same problem, as a sentence about the same field."""
    assert response.status_code == 422, response.status_code
    assert str(escape(sentence(f"{field} {problem}"))) in response.get_data(as_text=True)


@with_limits
def test_registration_limits_agree(app, client):
    accepted = [("ab", "x" * 6), ("abcdefgh", "x" * 14)]
    for number, (username, password) in enumerate(accepted):
        assert client.post("/api/v1/users", json={"username": username, "password": password}).status_code == 201
        browser = app.test_client()
        name = f"w{number}{username}"[:8]
        page = browser.post("/register", data={"username": name, "password": password, "confirm": password})
        assert page.status_code == 302, page.get_data(as_text=True)[:300]

    refused = [
        ("username", "a", "must be 2-8 characters: letters, digits, '_', '.' or '-'"),
        ("username", "abcdefghi", "must be 2-8 characters: letters, digits, '_', '.' or '-'"),
        ("password", "x" * 5, "must be 6-14 characters"),
        ("password", "x" * 15, "must be 6-14 characters"),
    ]
    for field, value, problem in refused:
        body = {"username": "fine", "password": "x" * 8, field: value}
        assert api_problem(client.post("/api/v1/users", json=body), field) == problem
        form = {**body, "confirm": body["password"]}
        web_says(app.test_client().post("/register", data=form), field, problem)
        with app.app_context(), pytest.raises(InvalidInput, match=f"^{field} {problem}$"):
            auth_services.new_user(body["username"], body["password"])


@with_limits
def test_title_message_and_token_name_limits_agree(app, client, auth):
    headers = auth.headers("limits", "x" * 8)
    client.post("/api/v1/users", json={"username": "webby", "password": "x" * 8})
    browser = app.test_client()
    assert browser.post("/login", data={"username": "webby", "password": "x" * 8}).status_code == 302
    conversation = client.post("/api/v1/conversations", json={"title": "t" * 10}, headers=headers)
    assert conversation.status_code == 201
    api_conversation = f"/api/v1/conversations/{conversation.get_json()['id']}"
    web_conversation = f"/c/{start_conversation(browser)}"

    # At the limit: accepted by both.
    assert client.patch(api_conversation, json={"title": "u" * 10}, headers=headers).status_code == 200
    assert browser.post(f"{web_conversation}/rename", data={"title": "u" * 10}).status_code == 302
    assert client.post(f"{api_conversation}/messages", json={"content": "m" * 50}, headers=headers).status_code == 202
    assert browser.post(f"{web_conversation}/messages", data={"content": "m" * 50}).status_code == 302
    assert app.extensions["chatapp.reply_runner"].wait_idle(30)
    token = client.post("/api/v1/tokens", json={"username": "limits", "password": "x" * 8, "name": "n" * 5})
    assert token.status_code == 201
    assert browser.post("/settings/tokens", data={"name": "n" * 5}).status_code == 201

    # Past it: refused by both, in the same words.
    title_problem = api_problem(client.patch(api_conversation, json={"title": "u" * 11}, headers=headers), "title")
    assert title_problem == "must be 1-10 characters"
    web_says(browser.post(f"{web_conversation}/rename", data={"title": "u" * 11}), "title", title_problem)
    created = client.post("/api/v1/conversations", json={"title": "u" * 11}, headers=headers)
    assert api_problem(created, "title") == title_problem

    content_problem = api_problem(
        client.post(f"{api_conversation}/messages", json={"content": "m" * 51}, headers=headers), "content"
    )
    assert content_problem == "must be 1-50 characters"
    web_says(browser.post(f"{web_conversation}/messages", data={"content": "m" * 51}), "content", content_problem)

    name_problem = api_problem(
        client.post("/api/v1/tokens", json={"username": "limits", "password": "x" * 8, "name": "n" * 6}), "name"
    )
    assert name_problem == "must be 0-5 characters"
    web_says(browser.post("/settings/tokens", data={"name": "n" * 6}), "name", name_problem)

    with app.app_context():
        for check, value, field, problem in [
            (chat_services.validate_title, "u" * 11, "title", title_problem),
            (chat_services.validate_content, "m" * 51, "content", content_problem),
        ]:
            with pytest.raises(InvalidInput, match=f"^{field} {problem}$"):
                check(value)


@with_limits
def test_whitespace_and_nul_read_the_same_everywhere(app, client, auth):
    headers = auth.headers("spaces", "x" * 8)
    api_conversation = (
        f"/api/v1/conversations/{client.post('/api/v1/conversations', json={}, headers=headers).get_json()['id']}"
    )
    client.post("/api/v1/users", json={"username": "webspace", "password": "x" * 8})
    browser = app.test_client()
    assert browser.post("/login", data={"username": "webspace", "password": "x" * 8}).status_code == 302
    web_conversation = f"/c/{start_conversation(browser)}"
    problem = api_problem(client.patch(api_conversation, json={"title": "   "}, headers=headers), "title")
    assert problem == "must contain a visible character and no NUL characters"
    web_says(browser.post(f"{web_conversation}/rename", data={"title": "   "}), "title", problem)
    assert (
        api_problem(client.post(f"{api_conversation}/messages", json={"content": "\n\t"}, headers=headers), "content")
        == problem
    )
    web_says(browser.post(f"{web_conversation}/messages", data={"content": "\n\t"}), "content", problem)


@pytest.mark.parametrize(
    "settings, complaint",
    [
        ({"TITLE_MAX_LENGTH": 201}, "TITLE_MAX_LENGTH can be at most 200"),
        ({"USERNAME_MAX_LENGTH": 41}, "USERNAME_MAX_LENGTH can be at most 40"),
        ({"TOKEN_NAME_MAX_LENGTH": 101}, "TOKEN_NAME_MAX_LENGTH can be at most 100"),
        ({"PASSWORD_MIN_LENGTH": 20, "PASSWORD_MAX_LENGTH": 10}, "PASSWORD_MIN_LENGTH and PASSWORD_MAX_LENGTH"),
        ({"USERNAME_MIN_LENGTH": 0}, "USERNAME_MIN_LENGTH and USERNAME_MAX_LENGTH"),
        ({"MESSAGE_MAX_LENGTH": "32000"}, "MESSAGE_MAX_LENGTH must be a whole number"),
        ({"MESSAGE_MAX_LENGTH": 200_000}, "BOT_HISTORY_MAX_CHARS must be a whole number of at least 200000"),
    ],
)
def test_start_up_refuses_limits_that_cannot_hold(settings, complaint):
    with pytest.raises(ConfigError, match=complaint):
        create_app({**base_test_config("sqlite://"), **settings})
