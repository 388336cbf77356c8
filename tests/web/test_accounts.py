"""Register, log in, log out in the browser: the API's rules, a message on the page, nothing written on bad input."""

import pytest

from chatapp.auth.models import User
from tests.web.conftest import PASSWORD, count


def test_register_logs_in_and_shows_the_empty_state(client, app, web):
    page = client.get("/register")
    assert page.status_code == 200
    assert '<label class="label" for="username">Username</label>' in page.get_data(as_text=True)

    response = web.register("alice")
    assert response.headers["Location"] == "/"
    home = client.get("/").get_data(as_text=True)
    assert "Welcome, alice!" in home
    assert "Start your first conversation" in home
    assert count(app, User, User.username == "alice") == 1


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"username": "al", "password": PASSWORD, "confirm": PASSWORD}, "Username must be 3-40 characters"),
        ({"username": "bad name!", "password": PASSWORD, "confirm": PASSWORD}, "Username must be 3-40 characters"),
        ({"username": "alice", "password": "short", "confirm": "short"}, "Password must be 8-200 characters"),
        ({"username": "alice", "password": PASSWORD, "confirm": PASSWORD + "x"}, "The passwords do not match."),
        ({"username": "", "password": PASSWORD, "confirm": PASSWORD}, "This field is required."),
        ({"username": "alice", "password": "x" * 201, "confirm": "x" * 201}, "Password must be 8-200 characters"),
    ],
)
def test_register_rejects_bad_input_and_writes_nothing(client, app, form, message):
    response = client.post("/register", data=form)
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)
    assert 'aria-invalid="true"' in response.get_data(as_text=True)
    assert count(app, User) == 0
    assert client.get("/").status_code == 302  # not logged in


def test_register_taken_username_is_a_conflict(client, app, web):
    web.register("alice")
    web.logout()
    response = client.post("/register", data={"username": "alice", "password": PASSWORD, "confirm": PASSWORD})
    assert response.status_code == 409
    assert "Username &#39;alice&#39; is taken; choose another." in response.get_data(as_text=True)
    assert count(app, User) == 1


def test_registration_closed(client, app):
    app.config["REGISTRATION_OPEN"] = False
    page = client.get("/register")
    assert page.status_code == 403
    assert "Registration is closed on this server" in page.get_data(as_text=True)
    response = client.post("/register", data={"username": "alice", "password": PASSWORD, "confirm": PASSWORD})
    assert response.status_code == 403
    assert count(app, User) == 0
    assert "Create an account" not in client.get("/login").get_data(as_text=True)


def test_login_and_safe_next(client, web):
    web.register("alice")
    web.logout()
    assert client.get("/settings").headers["Location"] == "/login?next=%2Fsettings"
    response = client.post("/login?next=%2Fsettings", data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert response.headers["Location"] == "/settings"
    assert client.get("/settings").status_code == 200
    # Logged in already: the login page sends you on.
    assert client.get("/login").status_code == 302


@pytest.mark.parametrize(
    "target", ["//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"]
)
def test_login_never_redirects_off_site(client, web, target):
    web.register("alice")
    web.logout()
    response = client.post("/login", query_string={"next": target}, data={"username": "alice", "password": PASSWORD})
    assert response.headers["Location"] == "/"


@pytest.mark.parametrize(("username", "password"), [("alice", "wrong password"), ("nobody", PASSWORD)])
def test_wrong_credentials_show_one_message(client, web, username, password):
    web.register("alice")
    web.logout()
    response = client.post("/login", data={"username": username, "password": password})
    assert response.status_code == 401
    assert "Wrong username or password." in response.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_empty_login_form_is_rejected(client):
    response = client.post("/login", data={"username": "", "password": ""})
    assert response.status_code == 422
    assert "This field is required." in response.get_data(as_text=True)


def test_logout_is_a_post_and_ends_the_login(client, web):
    web.register("alice")
    assert client.get("/logout").status_code == 405
    assert client.get("/").status_code == 200
    response = web.logout()
    assert response.headers["Location"] == "/login"
    assert client.get("/").status_code == 302
    assert client.get("/api/v1/conversations").status_code == 401


def _session_cookie(response) -> str:
    cookies = [value for value in response.headers.getlist("Set-Cookie") if value.startswith("session=")]
    assert cookies, "no session cookie set"
    return cookies[-1]


def test_login_cookie_is_httponly_and_samesite_lax(client, web):
    cookie = _session_cookie(web.register("alice"))
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie


@pytest.mark.parametrize("extra_config", [{"SESSION_COOKIE_SECURE": True}], indirect=True)
def test_login_cookie_is_secure_when_configured(client, web):
    response = client.post("/register", data={"username": "alice", "password": PASSWORD, "confirm": PASSWORD})
    cookie = _session_cookie(response)
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
