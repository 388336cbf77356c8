"""Accounts in the browser: registration shows every problem at once, usernames in any case,
changing the password (other browsers logged out), deleting the account after a confirmation."""

import re

import pytest
import sqlalchemy as sa

from chatapp.auth.models import ApiToken, LoginSession, User
from chatapp.chat.models import Conversation, Message
from chatapp.db import unit_of_work
from tests.web.conftest import PASSWORD, count

NEW_PASSWORD = "battery staple"


@pytest.fixture
def alice(web):
    web.register("alice")
    return web


def second_browser(app, username="alice", password=PASSWORD):
    other = app.test_client()
    assert other.post("/login", data={"username": username, "password": password}).status_code == 302
    return other


def logged_in(client) -> bool:
    return client.get("/settings").status_code == 200


def password_hash(app) -> str:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(User.password_hash))


def errors_on(html: str) -> list[str]:
    return re.findall(r'<p class="error-text" id="[^"]+">([^<]*)</p>', html)


# --- registration ---------------------------------------------------------------------------------


def test_registration_shows_every_problem_at_once(client, app, web):
    web.register("alice")
    web.logout()
    response = client.post("/register", data={"username": "ALICE", "password": "short", "confirm": "other"})
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    found = errors_on(html.replace("&#39;", "'"))
    assert found == [
        "Username 'ALICE' is taken; choose another.",
        "Password must be 8-200 characters.",
        "The passwords do not match.",
    ], found
    assert count(app, User) == 1


def test_a_name_taken_in_another_case_alone_is_a_conflict(client, app, web):
    web.register("alice")
    web.logout()
    response = client.post("/register", data={"username": "Alice", "password": PASSWORD, "confirm": PASSWORD})
    assert response.status_code == 409
    assert errors_on(response.get_data(as_text=True).replace("&#39;", "'")) == [
        "Username 'Alice' is taken; choose another."
    ]
    assert count(app, User) == 1
    # The name logs in in any case.
    assert client.post("/login", data={"username": "ALICE", "password": PASSWORD}).status_code == 302


# --- change password ------------------------------------------------------------------------------


def change(client, **fields):
    data = {"current_password": PASSWORD, "new_password": NEW_PASSWORD, "confirm_new_password": NEW_PASSWORD}
    return client.post("/settings/password", data={**data, **fields})


def test_settings_has_the_password_form_and_the_danger_zone(client, alice):
    html = client.get("/settings").get_data(as_text=True)
    assert 'action="/settings/password#password"' in html and 'name="revoke_tokens"' in html
    assert "Danger zone" in html and 'href="/settings/delete-account"' in html


def test_change_password_logs_out_the_other_browsers_and_keeps_this_one(client, app, alice):
    other = second_browser(app)
    token = client.post("/settings/tokens", data={"name": "kept"}).status_code
    assert token == 201
    response = change(client)
    assert response.status_code == 302 and response.headers["Location"] == "/settings"
    html = client.get("/settings").get_data(as_text=True)
    assert "Your password is changed; 1 other browser was logged out." in html
    assert not logged_in(other)
    assert count(app, LoginSession) == 1
    assert count(app, ApiToken, ApiToken.revoked_at.is_(None)) == 1  # not asked to revoke
    client.post("/logout")
    assert client.post("/login", data={"username": "alice", "password": PASSWORD}).status_code == 401
    assert client.post("/login", data={"username": "alice", "password": NEW_PASSWORD}).status_code == 302


def test_change_password_revokes_the_tokens_when_asked(client, app, alice):
    assert client.post("/settings/tokens", data={"name": "gone"}).status_code == 201
    response = change(client, revoke_tokens="y")
    assert response.status_code == 302
    assert "Your API tokens are revoked." in client.get("/settings").get_data(as_text=True)
    assert count(app, ApiToken, ApiToken.revoked_at.is_(None)) == 0


@pytest.mark.parametrize(
    "fields, status, message",
    [
        ({"current_password": "wrong password"}, 403, "Wrong password: your password was not changed."),
        ({"new_password": "short", "confirm_new_password": "short"}, 422, "Password must be 8-200 characters."),
        ({"confirm_new_password": "something else"}, 422, "The new passwords do not match."),
        ({"current_password": ""}, 422, "This field is required."),
    ],
)
def test_a_refused_change_says_why_and_changes_nothing(client, app, alice, fields, status, message):
    other = second_browser(app)
    assert client.post("/settings/tokens", data={"name": "kept"}).status_code == 201
    before = password_hash(app)
    response = change(client, revoke_tokens="y", **fields)
    assert response.status_code == status
    assert message in errors_on(response.get_data(as_text=True))
    assert password_hash(app) == before
    assert logged_in(other) and logged_in(client)
    assert count(app, ApiToken, ApiToken.revoked_at.is_(None)) == 1


# --- delete the account ---------------------------------------------------------------------------


def test_delete_account_asks_for_the_password_then_deletes_everything(client, app, alice, web):
    conversation_id = alice.new_conversation()
    assert client.post(f"/c/{conversation_id}/messages", data={"content": "hello"}).status_code == 302
    assert client.post("/settings/tokens", data={"name": "gone"}).status_code == 201
    other = second_browser(app)
    bobs = app.test_client()
    assert (
        bobs.post("/register", data={"username": "bob", "password": PASSWORD, "confirm": PASSWORD}).status_code == 302
    )

    confirm = client.get("/settings/delete-account")
    assert confirm.status_code == 200
    page = confirm.get_data(as_text=True)
    assert "Delete your account “alice”?" in page and 'type="password"' in page

    wrong = client.post("/settings/delete-account", data={"delete_password": "wrong password"})
    assert wrong.status_code == 403
    assert "Wrong password: your account was not deleted." in errors_on(wrong.get_data(as_text=True))
    assert client.post("/settings/delete-account", data={}).status_code == 422
    assert count(app, User) == 2 and count(app, Conversation) == 1

    response = client.post("/settings/delete-account", data={"delete_password": PASSWORD})
    assert response.status_code == 302 and response.headers["Location"] == "/login"
    login_page = client.get("/login").get_data(as_text=True)
    assert "Your account and all its data are deleted." in login_page
    with unit_of_work(app, write=False) as session:
        assert session.scalars(sa.select(User.username)).all() == ["bob"]
        for model in (Conversation, Message, ApiToken):
            assert session.scalar(sa.select(sa.func.count()).select_from(model)) == 0
        assert session.scalar(sa.select(sa.func.count()).select_from(LoginSession)) == 1  # bob's
    assert not logged_in(client) and not logged_in(other)
    assert client.get("/settings").headers["Location"].startswith("/login")


# --- an ended login on a page ---------------------------------------------------------------------


def test_a_page_whose_login_ended_goes_to_the_login_page(client, app, alice):
    conversation_id = alice.new_conversation()
    other = second_browser(app)
    assert other.post("/settings/sessions/end-all").status_code == 302
    response = client.get(f"/c/{conversation_id}")
    assert response.status_code == 302
    assert response.headers["Location"] == f"/login?next=%2Fc%2F{conversation_id}"


def test_pages_tell_the_script_where_to_log_in(client, alice):
    assert '<meta name="login-url" content="/login">' in client.get("/settings").get_data(as_text=True)


@pytest.mark.parametrize(
    "extra_config", [{"RATELIMIT_ENABLED": True, "RATELIMIT_LOGIN_USERNAME": "2 per minute"}], indirect=True
)
def test_wrong_passwords_in_settings_are_rate_limited_like_logins(client, app, alice):
    for _ in range(2):
        assert change(client, current_password="guess").status_code == 403
    before = password_hash(app)
    assert change(client).status_code == 429  # even the right password, once over the limit
    assert client.post("/settings/delete-account", data={"delete_password": PASSWORD}).status_code == 429
    assert password_hash(app) == before and count(app, User) == 1
