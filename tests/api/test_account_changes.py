"""Changing the password, deleting the account, usernames unique in any case, every
registration problem at once: through the API (and the browser's login cookie)."""

import logging

import pytest
import sqlalchemy as sa

from chatapp.auth import services as auth_services
from chatapp.auth.models import ApiToken, LoginSession, User
from chatapp.chat.models import Conversation, Message
from chatapp.db import unit_of_work
from tests.helpers import wait_for_background_work
from tests.web.conftest import csrf_from

PASSWORD = "correct horse"
NEW_PASSWORD = "battery staple"


def counts(app) -> dict[str, int]:
    with unit_of_work(app, write=False) as session:
        return {
            model.__name__: session.scalar(sa.select(sa.func.count()).select_from(model))
            for model in (User, ApiToken, LoginSession, Conversation, Message)
        }


def browser(app, username="alice", password=PASSWORD):
    """A test client logged in through the login form (a login session and its cookie)."""
    client = app.test_client()
    assert client.post("/login", data={"username": username, "password": password}).status_code == 302
    assert client.get("/settings").status_code == 200
    return client


def logged_in(client) -> bool:
    return client.get("/settings").status_code == 200


def change(client, headers=None, **body):
    body = {"current_password": PASSWORD, "new_password": NEW_PASSWORD, **body}
    return client.post("/api/v1/users/me/password", json=body, headers=headers or {})


def error_of(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()["error"]


# --- change password ------------------------------------------------------------------------


def test_change_password_with_a_token_logs_out_every_browser_and_keeps_tokens(client, app, auth):
    headers = auth.headers()
    other_browsers = [browser(app), browser(app)]
    response = change(client, headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"login_sessions_ended": 2, "tokens_revoked": False}
    assert not any(logged_in(b) for b in other_browsers)
    # The token still works (not asked to revoke); the new password logs in, the old does not.
    assert client.get("/api/v1/conversations", headers=headers).status_code == 200
    assert client.post("/api/v1/tokens", json={"username": "alice", "password": PASSWORD}).status_code == 401
    assert client.post("/api/v1/tokens", json={"username": "alice", "password": NEW_PASSWORD}).status_code == 201


def test_change_password_from_a_browser_keeps_that_browser_logged_in(app, auth):
    auth.register()
    this_one, other = browser(app), browser(app)
    # The page script's way: the login cookie and the page's CSRF token.
    csrf = {"X-CSRFToken": csrf_from(this_one.get("/settings").get_data(as_text=True))}
    response = change(this_one, csrf)
    assert response.get_json() == {"login_sessions_ended": 1, "tokens_revoked": False}
    assert logged_in(this_one) and not logged_in(other)
    assert counts(app)["LoginSession"] == 1


def test_tokens_are_revoked_only_when_asked(client, app, auth):
    headers = auth.headers()
    spare = {"Authorization": f"Bearer {auth.token()}"}
    assert change(client, headers, revoke_tokens=False).status_code == 200
    assert client.get("/api/v1/conversations", headers=spare).status_code == 200
    response = change(client, headers, current_password=NEW_PASSWORD, new_password="third password", revoke_tokens=True)
    assert response.get_json() == {"login_sessions_ended": 0, "tokens_revoked": True}
    for each in (headers, spare):
        assert error_of(client.get("/api/v1/conversations", headers=each), 401)["code"] == "invalid_token"
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(sa.func.count()).where(ApiToken.revoked_at.is_(None))) == 0


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"current_password": "wrong password"}, 403, "wrong_password"),
        ({"new_password": "short"}, 422, "invalid"),
        ({"new_password": "x" * 201}, 422, "invalid"),
        ({"current_password": ""}, 422, "invalid"),
        ({"revoke_tokens": "yes please"}, 422, "invalid"),
    ],
)
def test_a_refused_change_changes_nothing(client, app, auth, body, status, code):
    headers = auth.headers()
    other = browser(app)
    with unit_of_work(app, write=False) as session:
        old_hash = session.scalar(sa.select(User.password_hash))
    assert error_of(change(client, headers, **{"revoke_tokens": True, **body}), status)["code"] == code
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(User.password_hash)) == old_hash
    assert logged_in(other)
    assert client.get("/api/v1/conversations", headers=headers).status_code == 200


def test_a_password_hash_is_replaced_only_over_the_hash_it_was_read_with(app, auth):
    """A rehash at login and a password change write through one guarded UPDATE: over a hash
    that changed meanwhile (another change won the race) neither writes anything."""
    auth.register("alice", PASSWORD)
    auth.token("alice", PASSWORD)
    revoked = sa.select(sa.func.count()).where(ApiToken.revoked_at.is_not(None))
    with unit_of_work(app) as session:
        user_id, read = session.execute(sa.select(User.id, User.password_hash)).one()
        assert auth_services.replace_password_hash(user_id, read, "first") is True
        assert auth_services.replace_password_hash(user_id, read, "second") is False
        assert auth_services.set_password(user_id, read, "third", keep_session=None, revoke_tokens=True) is None
        assert session.scalar(sa.select(User.password_hash)) == "first"
        assert session.scalar(revoked) == 0
        assert auth_services.set_password(user_id, "first", "fourth", keep_session=None, revoke_tokens=True) == 0
        assert (session.scalar(sa.select(User.password_hash)), session.scalar(revoked)) == ("fourth", 1)


def test_change_password_needs_credentials(client, auth):
    auth.register()
    assert error_of(change(client), 401)["code"] == "unauthorized"


@pytest.mark.parametrize(
    "extra_config", [{"RATELIMIT_ENABLED": True, "RATELIMIT_LOGIN_USERNAME": "3 per minute"}], indirect=True
)
def test_wrong_current_passwords_are_rate_limited_like_logins(client, auth):
    headers = auth.headers()
    for _ in range(3):
        assert change(client, headers, current_password="guess").status_code == 403
    assert change(client, headers, current_password="guess").status_code == 429
    # Deleting the account checks the password too: the same count.
    response = client.delete("/api/v1/users/me", json={"password": PASSWORD}, headers=headers)
    assert response.status_code == 429


# --- delete the account ---------------------------------------------------------------------


def seed(client, headers, title="kept") -> int:
    conversation = client.post("/api/v1/conversations", json={"title": title}, headers=headers).get_json()
    url = f"/api/v1/conversations/{conversation['id']}/messages"
    assert client.post(url, json={"content": "hello"}, headers=headers).status_code == 202
    return conversation["id"]


def test_delete_account_deletes_all_its_data_and_nothing_else(client, app, auth):
    headers = auth.headers()
    bob = auth.headers("bob")
    seed(client, headers)
    seed(client, headers, "second")
    seed(client, bob, "bob's")
    wait_for_background_work(app)
    alices_browser = browser(app)
    browser(app, "bob")
    before = counts(app)
    assert before == {"User": 2, "ApiToken": 2, "LoginSession": 2, "Conversation": 3, "Message": 6}

    response = client.delete("/api/v1/users/me", json={"password": PASSWORD}, headers=headers)
    assert response.status_code == 204, response.get_data(as_text=True)
    assert counts(app) == {"User": 1, "ApiToken": 1, "LoginSession": 1, "Conversation": 1, "Message": 2}
    assert error_of(client.get("/api/v1/conversations", headers=headers), 401)["code"] == "invalid_token"
    assert not logged_in(alices_browser)
    assert client.post("/api/v1/tokens", json={"username": "alice", "password": PASSWORD}).status_code == 401
    # Bob's things are untouched, and the name is free again.
    assert [c["title"] for c in client.get("/api/v1/conversations", headers=bob).get_json()["items"]] == ["bob's"]
    auth.register("Alice")


@pytest.mark.parametrize("body", [{"password": "wrong password"}, {"password": ""}, {}, {"password": 5}])
def test_delete_account_refused_without_the_right_password(client, app, auth, body):
    headers = auth.headers()
    seed(client, headers)
    wait_for_background_work(app)
    before = counts(app)
    response = client.delete("/api/v1/users/me", json=body, headers=headers)
    assert response.status_code in (403, 422), response.get_data(as_text=True)
    assert counts(app) == before
    assert client.get("/api/v1/conversations", headers=headers).status_code == 200


def test_delete_account_while_a_reply_is_being_written(client, app, auth, gated_bot, caplog):
    """The runner finds its reply gone and ends cleanly: no error, nothing left behind."""
    caplog.set_level(logging.WARNING)
    headers = auth.headers()
    seed(client, headers)
    assert gated_bot.thinking.wait(10)
    response = client.delete("/api/v1/users/me", json={"password": PASSWORD}, headers=headers)
    assert response.status_code == 204
    gated_bot.go_on.set()
    wait_for_background_work(app)
    assert counts(app) == {"User": 0, "ApiToken": 0, "LoginSession": 0, "Conversation": 0, "Message": 0}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --- usernames regardless of case -------------------------------------------------------------


def test_usernames_differing_only_by_case_cannot_both_register(client, app, auth):
    auth.register("alice")
    for name in ("ALICE", "Alice", "aLiCe"):
        response = client.post("/api/v1/users", json={"username": name, "password": PASSWORD})
        assert error_of(response, 409)["code"] == "username_taken"
    assert counts(app)["User"] == 1


def test_the_database_refuses_a_duplicate_in_another_case(app, auth):
    auth.register("alice")
    with pytest.raises(sa.exc.IntegrityError), unit_of_work(app) as session:
        session.add(User(username="ALICE", password_hash="x"))
        session.flush()


def test_login_ignores_the_case_of_the_username_and_keeps_it_as_typed(client, app, auth):
    assert auth.register("Alice")["username"] == "Alice"
    assert client.post("/api/v1/tokens", json={"username": "aLICE", "password": PASSWORD}).status_code == 201
    assert client.post("/login", data={"username": "ALICE", "password": PASSWORD}).status_code == 302
    assert "Alice" in client.get("/settings").get_data(as_text=True)


# --- registration reports everything ------------------------------------------------------------


def test_registration_reports_every_problem_at_once(client, app, auth):
    auth.register("alice")
    response = client.post("/api/v1/users", json={"username": "ALICE", "password": "short"})
    error = error_of(response, 422)
    assert error["code"] == "invalid" and "'username'" in error["message"]
    assert set(error["fields"]) == {"username", "password"}
    assert "taken" in error["fields"]["username"][0]
    assert error["fields"]["password"] == ["must be 8-200 characters"]
    response = client.post("/api/v1/users", json={"username": "a b", "password": "short"})
    assert set(error_of(response, 422)["fields"]) == {"username", "password"}
    assert counts(app)["User"] == 1


# --- the browser's API calls after its login ended ---------------------------------------------------


def test_a_cookie_whose_login_ended_is_told_to_log_in_again(app, auth):
    auth.register()
    this_one, other = browser(app), browser(app)
    csrf = {"X-CSRFToken": csrf_from(this_one.get("/settings").get_data(as_text=True))}
    assert this_one.delete("/api/v1/login-sessions", headers=csrf).status_code == 200  # "log out everywhere"
    for client in (this_one, other):
        error = error_of(client.get("/api/v1/conversations"), 401)
        assert error["code"] == "session_ended" and "Bearer" not in error["message"]
    # Without any login cookie the API still explains tokens.
    assert "Bearer" in error_of(app.test_client().get("/api/v1/conversations"), 401)["message"]
