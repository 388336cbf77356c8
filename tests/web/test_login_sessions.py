"""Browser logins live on the server (login_sessions): logging out ends them wherever the cookie
was copied, "Log out everywhere" ends them all, and logging in starts a fresh Flask session."""

import re
from datetime import timedelta

import pytest
import sqlalchemy as sa
from flask_login import current_user

from chatapp.auth.models import LoginSession
from chatapp.db import db, unit_of_work, utcnow
from tests.api.test_fast_paths import count_statements
from tests.web.conftest import PASSWORD, WebUser, count, csrf_from


def cookie(client, name: str = "session") -> str:
    found = client.get_cookie(name)
    assert found is not None, f"no {name} cookie"
    return found.value


def browser_with(app, value: str, name: str = "session"):
    """Another browser holding a copy of a cookie (as a thief or a shared computer would)."""
    copy = app.test_client()
    copy.set_cookie(name, value)
    return copy


def browser(app, address: str = "127.0.0.1", agent: str = "TestBrowser/1.0"):
    client = app.test_client()
    client.environ_base.update({"REMOTE_ADDR": address, "HTTP_USER_AGENT": agent})
    return client


def assert_logged_out(client):
    response = client.get("/settings")
    assert response.status_code == 302 and response.headers["Location"].startswith("/login")
    assert client.get("/api/v1/conversations").status_code == 401


def test_a_cookie_copied_before_logout_is_refused_after_it(client, app, web):
    web.register("alice")
    copy = browser_with(app, cookie(client))
    assert copy.get("/settings").status_code == 200  # the copy works while the login lasts
    web.logout()
    assert_logged_out(copy)
    assert_logged_out(client)
    assert count(app, LoginSession) == 0


def test_log_out_everywhere_ends_every_browser_but_not_api_tokens(client, app, web, auth):
    web.register("alice")
    laptop = browser(app, "198.51.100.2")
    WebUser(laptop).login("alice")
    token = {"Authorization": f"Bearer {auth.token('alice')}"}
    assert laptop.get("/settings").status_code == 200

    response = client.post("/settings/sessions/end-all")
    assert response.headers["Location"] == "/login"
    page = client.get("/login").get_data(as_text=True)
    assert "You are logged out everywhere: 2 browsers were logged out." in page
    assert_logged_out(client)
    assert_logged_out(laptop)
    assert count(app, LoginSession) == 0
    assert app.test_client().get("/api/v1/conversations", headers=token).status_code == 200


def test_log_out_everywhere_through_the_api(client, app, web, auth):
    web.register("alice")
    WebUser(laptop := browser(app)).login("alice")
    token = {"Authorization": f"Bearer {auth.token('alice')}"}
    response = app.test_client().delete("/api/v1/login-sessions", headers=token)
    assert response.status_code == 200 and response.get_json() == {"ended": 2}
    assert_logged_out(client)
    assert_logged_out(laptop)
    assert app.test_client().delete("/api/v1/login-sessions").status_code == 401


def test_settings_lists_the_browsers_and_ends_one(client, app, web):
    web.register("alice")
    phone = browser(app, "198.51.100.7", "PhoneBrowser/2.0 <b>")
    WebUser(phone).login("alice")
    html = client.get("/settings").get_data(as_text=True)
    assert html.count("This browser") == 1
    assert "PhoneBrowser/2.0 &lt;b&gt;" in html and "198.51.100.7" in html
    own_id, phone_id = (int(n) for n in re.findall(r'action="/settings/sessions/(\d+)/end"', html))

    response = client.post(f"/settings/sessions/{phone_id}/end")
    assert response.headers["Location"] == "/settings"
    assert "That browser is logged out." in client.get("/settings").get_data(as_text=True)
    assert_logged_out(phone)
    assert client.post(f"/settings/sessions/{phone_id}/end").status_code == 404  # already ended

    # Ending this browser's own session is logging out.
    response = client.post(f"/settings/sessions/{own_id}/end")
    assert response.headers["Location"] == "/login"
    assert_logged_out(client)


@pytest.mark.parametrize("extra_config", [{"WTF_CSRF_ENABLED": True}], indirect=True)
def test_logging_in_starts_a_new_flask_session(client, app, web):
    web.register("alice")
    web.logout()
    old_token = csrf_from(client.get("/login").get_data(as_text=True))
    # What an attacker who can set a victim's cookie before login would plant.
    with client.session_transaction() as planted:
        planted["fixated"] = "chosen by someone else"
        old_raw_token = planted["csrf_token"]
    old_cookie = cookie(client)

    response = client.post(
        "/login?next=%2Fsettings", data={"username": "alice", "password": PASSWORD, "csrf_token": old_token}
    )
    assert response.headers["Location"] == "/settings"  # where to go next is kept
    assert cookie(client) != old_cookie
    with client.session_transaction() as fresh:
        assert "fixated" not in fresh
        assert "csrf_token" not in fresh  # a new one is made by the next page
    new_token = csrf_from(client.get("/settings").get_data(as_text=True))
    with client.session_transaction() as fresh:
        assert fresh["csrf_token"] != old_raw_token
    # The token from before the login no longer passes; the new one does.
    assert client.post("/settings/tokens", data={"name": "t", "csrf_token": old_token}).status_code == 400
    assert client.post("/settings/tokens", data={"name": "t", "csrf_token": new_token}).status_code == 201


@pytest.mark.parametrize("extra_config", [{"REMEMBER_COOKIE_REFRESH_EACH_REQUEST": True}], indirect=True)
def test_a_remember_me_cookie_names_the_login_session_and_ends_with_it(client, app, web):
    """The app never asks for one, but Flask-Login sets it when configured: it holds get_id()."""
    web.register("alice")
    client.get("/")
    remembered = cookie(client, "remember_token")
    assert browser_with(app, remembered, "remember_token").get("/settings").status_code == 200
    client.post("/settings/sessions/end-all")
    assert_logged_out(browser_with(app, remembered, "remember_token"))


def test_a_login_session_ends_after_the_session_lifetime(client, app, web):
    web.register("alice")
    with unit_of_work(app) as session:
        session.execute(
            sa.update(LoginSession).values(created_at=utcnow() - app.permanent_session_lifetime - timedelta(minutes=1))
        )
    assert_logged_out(client)
    web.login("alice")  # and the expired row goes when alice logs in again
    assert count(app, LoginSession) == 1


def last_seen(app):
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(LoginSession.last_seen_at))


def test_last_seen_is_written_at_most_every_few_minutes(client, app, web):
    web.register("alice")
    at_login = last_seen(app)
    assert client.get("/").status_code == 200
    assert last_seen(app) == at_login  # too soon to write again
    long_ago = utcnow() - timedelta(minutes=10)
    with unit_of_work(app) as session:
        session.execute(sa.update(LoginSession).values(last_seen_at=long_ago))
    assert client.get("/api/v1/conversations").status_code == 200
    written = last_seen(app)
    assert written > long_ago + timedelta(minutes=9)
    assert client.get("/settings").status_code == 200
    assert last_seen(app) == written


def test_the_logged_in_user_is_loaded_in_one_query(client, app, web):
    """Flask-Login loads the user on every browser request: the login session and its user at once."""
    web.register("alice")
    with app.test_request_context("/", headers={"Cookie": f"session={cookie(client)}"}):
        seen, stop = count_statements(app)
        try:
            assert current_user.username == "alice"
        finally:
            stop()
        db.session.rollback()
    assert len(seen) == 1, seen
