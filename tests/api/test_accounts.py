"""POST /users, POST /tokens, DELETE /tokens/current, Bearer authentication, and password hashing."""

import threading
import time

import pytest
import sqlalchemy as sa
from werkzeug.security import check_password_hash, generate_password_hash

from chatapp.auth.models import ApiToken, User
from chatapp.auth.services import hash_token
from chatapp.config import Defaults
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
    assert_error(
        client.post("/api/v1/users", json={"username": "alice", "password": "other-pass"}), 409, "username_taken"
    )
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
    assert_error(
        client.post("/api/v1/users", json={"username": "alice", "password": "12345678"}), 403, "registration_closed"
    )
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


# --- password hashing: cost, concurrency, upgrades ---------------------------------------------


def test_the_default_password_hash_is_scrypt_at_2_to_the_17():
    """Werkzeug's own default is n=2**15; this one costs 128 MiB and about four times the time."""
    assert Defaults.PASSWORD_HASH_METHOD == "scrypt:131072:8:1"
    hashed = generate_password_hash("correct horse", Defaults.PASSWORD_HASH_METHOD)
    assert hashed.startswith("scrypt:131072:8:1$")
    assert check_password_hash(hashed, "correct horse")
    assert Defaults.PASSWORD_HASH_CONCURRENCY >= 1


def stored_hash(app, username: str) -> str:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(User.password_hash).where(User.username == username))


def test_a_login_rehashes_a_password_stored_with_another_method(client, app, hashing_watch):
    body = {"username": "alice", "password": "correct horse"}
    assert client.post("/api/v1/users", json=body).status_code == 201
    assert client.post("/api/v1/users", json={**body, "username": "bob"}).status_code == 201
    assert stored_hash(app, "alice").startswith("pbkdf2:sha256:1000$")
    # An upgrade changes the configured method (small scrypt parameters keep the test quick).
    app.config["PASSWORD_HASH_METHOD"] = "scrypt:16384:8:1"

    assert client.post("/api/v1/tokens", json={**body, "password": "wrong password"}).status_code == 401
    assert stored_hash(app, "alice").startswith("pbkdf2:sha256:1000$")  # only a right password
    assert client.post("/api/v1/tokens", json=body).status_code == 201
    upgraded = stored_hash(app, "alice")
    assert upgraded.startswith("scrypt:16384:8:1$")
    assert client.post("/api/v1/tokens", json=body).status_code == 201  # the new hash works
    assert stored_hash(app, "alice") == upgraded  # and is not made again

    assert client.post("/login", data={**body, "username": "bob"}).status_code == 302
    assert stored_hash(app, "bob").startswith("scrypt:16384:8:1$")
    assert set(hashing_watch) == {0}  # the rehashes too held no connection


def test_a_wrong_password_against_an_older_hash_costs_the_configured_method_too(client, app, monkeypatch):
    """Timing must not tell an old account from a name that does not exist: a failed check
    against a hash of a cheaper, older method also runs the configured method's check."""
    from chatapp.auth import services

    body = {"username": "alice", "password": "correct horse"}
    assert client.post("/api/v1/users", json=body).status_code == 201  # pbkdf2:sha256:1000
    app.config["PASSWORD_HASH_METHOD"] = "scrypt:16384:8:1"
    checked = []
    real = services.check_password_hash
    monkeypatch.setattr(
        services,
        "check_password_hash",
        lambda stored, password: checked.append(stored.split("$")[0]) or real(stored, password),
    )
    assert client.post("/api/v1/tokens", json={**body, "password": "wrong password"}).status_code == 401
    assert checked == ["pbkdf2:sha256:1000", "scrypt:16384:8:1"]
    checked.clear()
    assert client.post("/api/v1/tokens", json={**body, "username": "nobody"}).status_code == 401
    assert checked == ["scrypt:16384:8:1"]


@pytest.mark.parametrize("extra_config", [{"PASSWORD_HASH_CONCURRENCY": 2}], indirect=True)
def test_concurrent_password_hashes_are_bounded_and_wait_holding_no_connection(app, client, monkeypatch):
    """Four logins at once: two hash, two wait for a slot, and none of them holds a connection."""
    from chatapp.auth import services
    from tests.helpers import checked_out

    body = {"username": "alice", "password": "correct horse"}
    assert client.post("/api/v1/users", json=body).status_code == 201
    lock = threading.Lock()
    state = {"arrived": 0, "hashing": 0, "most": 0}
    release = threading.Event()

    def arrive(function):
        def counted(*args):
            with lock:
                state["arrived"] += 1
            return function(*args)

        return counted

    def slow_check(*args):
        with lock:
            state["hashing"] += 1
            state["most"] = max(state["most"], state["hashing"])
        try:
            assert release.wait(20), "the test never released the hashes"
            return check_password_hash(*args)
        finally:
            with lock:
                state["hashing"] -= 1

    monkeypatch.setattr(services, "password_matches", arrive(services.password_matches))
    monkeypatch.setattr(services, "check_password_hash", slow_check)
    statuses = []
    logins = [
        threading.Thread(
            target=lambda: statuses.append(app.test_client().post("/api/v1/tokens", json=body).status_code)
        )
        for _ in range(4)
    ]
    for login in logins:
        login.start()
    deadline = time.monotonic() + 10
    while (state["arrived"] < 4 or state["hashing"] < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # room for a third hash to start, if anything let it
    assert state["arrived"] == 4 and state["hashing"] == 2
    assert checked_out(app) == 0
    release.set()
    for login in logins:
        login.join(20)
    assert statuses == [201] * 4
    assert state["most"] == 2


@pytest.mark.parametrize("extra_config", [{"PASSWORD_HASH_CONCURRENCY": 1}], indirect=True)
def test_a_login_that_waits_too_long_for_a_hashing_slot_is_a_503(app, client, monkeypatch):
    from chatapp.auth import services

    body = {"username": "alice", "password": "correct horse"}
    assert client.post("/api/v1/users", json=body).status_code == 201
    monkeypatch.setattr(services, "HASH_WAIT_SECONDS", 0.05)
    with app.app_context(), services._hashing_slot():  # the only slot, busy
        refused = client.post("/api/v1/tokens", json=body)
    assert_error(refused, 503, "busy")
    assert count(app, ApiToken) == 0
    assert client.post("/api/v1/tokens", json=body).status_code == 201
