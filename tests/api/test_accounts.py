"""POST /users, POST /tokens, DELETE /tokens/current, and Bearer authentication."""

import pytest
import sqlalchemy as sa

from chatapp.auth.models import ApiToken, User
from chatapp.auth.services import hash_token
from chatapp.db import unit_of_work


def count(app, model) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model))


def assert_error(response, status: int, code: str | None = None):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) >= {"code", "message"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


def test_register(client, app):
    response = client.post("/api/v1/users", json={"username": "al.ice_9-x", "password": "12345678"})
    assert response.status_code == 201
    body = response.get_json()
    assert body["username"] == "al.ice_9-x" and isinstance(body["id"], int)
    assert "password" not in body and "password_hash" not in body
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(User.password_hash)) != "12345678"


def test_register_taken_username(client, app):
    client.post("/api/v1/users", json={"username": "alice", "password": "12345678"})
    assert_error(client.post("/api/v1/users", json={"username": "alice", "password": "other-pass"}), 409, "username_taken")
    assert count(app, User) == 1


@pytest.mark.parametrize(
    "body, field",
    [
        ({"username": "ab", "password": "12345678"}, "username"),
        ({"username": "a" * 41, "password": "12345678"}, "username"),
        ({"username": "bad name", "password": "12345678"}, "username"),
        ({"username": "bad/name", "password": "12345678"}, "username"),
        ({"username": "émile", "password": "12345678"}, "username"),
        ({"username": "alice", "password": "1234567"}, "password"),
        ({"username": "alice", "password": "x" * 201}, "password"),
        ({"username": 12345, "password": "12345678"}, "username"),
        ({"username": "alice", "password": None}, "password"),
        ({"password": "12345678"}, "username"),
        ({"username": "alice"}, "password"),
        ({"username": "alice", "password": "12345678", "admin": True}, "admin"),
    ],
)
def test_register_validation(client, app, body, field):
    error = assert_error(client.post("/api/v1/users", json=body), 422, "invalid")
    assert f"'{field}'" in error["message"]
    assert count(app, User) == 0


def test_password_length_bounds_are_inclusive(client):
    assert client.post("/api/v1/users", json={"username": "abc", "password": "x" * 8}).status_code == 201
    assert client.post("/api/v1/users", json={"username": "a" * 40, "password": "x" * 200}).status_code == 201


@pytest.mark.parametrize("extra_config", [{"REGISTRATION_OPEN": False}], indirect=True)
def test_registration_can_be_closed(client, app):
    assert_error(client.post("/api/v1/users", json={"username": "alice", "password": "12345678"}), 403, "registration_closed")
    assert count(app, User) == 0


def test_token_for_good_credentials_is_stored_hashed(client, app, auth):
    auth.register()
    response = client.post("/api/v1/tokens", json={"username": "alice", "password": "correct horse", "name": "laptop"})
    assert response.status_code == 201
    body = response.get_json()
    assert body["token"].startswith("chat_") and body["name"] == "laptop"
    with unit_of_work(app, write=False) as session:
        row = session.scalar(sa.select(ApiToken))
        assert row.token_hash == hash_token(body["token"])
        assert body["token"] not in (row.token_hash, row.prefix)


@pytest.mark.parametrize(
    "body", [{"username": "alice", "password": "wrong password"}, {"username": "nobody", "password": "correct horse"}]
)
def test_token_wrong_credentials(client, app, auth, body):
    auth.register()
    error = assert_error(client.post("/api/v1/tokens", json=body), 401, "invalid_credentials")
    assert error["message"] == "wrong username or password"  # same answer: no user enumeration
    assert count(app, ApiToken) == 0


PROTECTED = [
    ("get", "/api/v1/conversations"),
    ("post", "/api/v1/conversations"),
    ("get", "/api/v1/conversations/1"),
    ("patch", "/api/v1/conversations/1"),
    ("delete", "/api/v1/conversations/1"),
    ("get", "/api/v1/conversations/1/messages"),
    ("post", "/api/v1/conversations/1/messages"),
    ("post", "/api/v1/conversations/1/messages/2/regenerate"),
    ("get", "/api/v1/conversations/1/messages/2/stream"),
    ("delete", "/api/v1/tokens/current"),
]


@pytest.mark.parametrize("method, path", PROTECTED)
@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Bearer ", "Token abc", "chat_abc", "Bearer chat_not-a-real-token", "Bearer " + "x" * 500],
)
def test_every_protected_route_rejects_bad_credentials(client, method, path, header):
    headers = {} if header is None else {"Authorization": header}
    response = getattr(client, method)(path, headers=headers, json={"title": "x", "content": "x"})
    assert_error(response, 401)


def test_revoke_current_token(client, app, auth):
    headers = auth.headers()
    other = {"Authorization": f"Bearer {auth.token()}"}
    assert client.delete("/api/v1/tokens/current", headers=headers).status_code == 204
    assert_error(client.get("/api/v1/conversations", headers=headers), 401, "invalid_token")
    assert_error(client.delete("/api/v1/tokens/current", headers=headers), 401)
    # Only the token used was revoked.
    assert client.get("/api/v1/conversations", headers=other).status_code == 200
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(sa.func.count()).where(ApiToken.revoked_at.is_not(None))) == 1


def test_token_use_is_recorded_without_failing_reads(client, app, auth):
    headers = auth.headers()
    assert client.get("/api/v1/conversations", headers=headers).status_code == 200
    with unit_of_work(app, write=False) as session:
        first = session.scalar(sa.select(ApiToken.last_used_at))
    assert first is not None
    # Throttled: a second use within a minute does not write again.
    assert client.get("/api/v1/conversations", headers=headers).status_code == 200
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(ApiToken.last_used_at)) == first


@pytest.fixture
def hashing_watch(app, monkeypatch):
    """Record how many connections are checked out whenever a password is hashed or checked."""
    from chatapp.auth import services
    from tests.helpers import checked_out

    seen = []

    def watch(function):
        def wrapper(*args, **kwargs):
            seen.append(checked_out(app))
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(services, "generate_password_hash", watch(services.generate_password_hash))
    monkeypatch.setattr(services, "check_password_hash", watch(services.check_password_hash))
    return seen


def test_passwords_are_hashed_and_checked_holding_no_connection(client, app, hashing_watch):
    """Hashing is deliberately slow: it must never hold a connection (or SQLite's write lock)."""
    body = {"username": "alice", "password": "correct horse"}
    assert client.post("/api/v1/users", json=body).status_code == 201
    assert client.post("/api/v1/tokens", json=body).status_code == 201
    assert client.post("/api/v1/tokens", json={**body, "password": "wrong password"}).status_code == 401
    assert client.post("/api/v1/tokens", json={**body, "username": "nobody"}).status_code == 401
    form = {"username": "bob", "password": "correct horse", "confirm": "correct horse"}
    assert client.post("/register", data=form).status_code == 302
    client.post("/logout")
    assert client.post("/login", data={"username": "bob", "password": "correct horse"}).status_code == 302
    assert len(hashing_watch) >= 6
    assert set(hashing_watch) == {0}
