"""Security headers, rate limits (in memory, behind a proxy, shared through Redis), and a walk
over the URL map proving that no route taking an id lets one user reach another's data.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time

import pytest
import requests
import sqlalchemy as sa
from flask import Blueprint

from chatapp.auth.models import ApiToken, LoginSession, User
from chatapp.chat.models import Conversation, Message
from chatapp.db import db, unit_of_work
from chatapp.security import CONTENT_SECURITY_POLICY
from tests.helpers import AuthActions, wait_for_background_work
from tests.support.servers import GunicornServer, free_port

PASSWORD = "correct horse"


def count(app, model) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model))


# --- headers ---------------------------------------------------------------------------------

EXPECTED_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}

crash = Blueprint("crash", __name__)


@crash.get("/probe/crash")
def crash_view():
    """An unexpected error: the 500 page must carry the headers too."""
    raise RuntimeError("boom")


def test_every_response_carries_the_security_headers(app, client, auth):
    app.register_blueprint(crash)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    headers = auth.headers("hdr-user")
    assert EXPECTED_HEADERS["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    responses = {
        "json 200": client.get("/api/v1/conversations", headers=headers),
        "json 201": client.post("/api/v1/conversations", json={}, headers=headers),
        "json 401": client.get("/api/v1/conversations"),
        "json 404": client.get("/api/v1/conversations/999", headers=headers),
        "json 415": client.post("/api/v1/conversations", data="x", headers=headers),
        "json 422": client.post("/api/v1/conversations", json={"title": ""}, headers=headers),
        "html 404": client.get("/no/such/page"),
        "405": client.delete("/healthz"),
        "500": client.get("/probe/crash"),
        "health": client.get("/healthz"),
        "metrics": client.get("/metrics"),
        "openapi": client.get("/api/v1/openapi.json"),
        "login page": client.get("/login"),
    }
    assert responses["500"].status_code == 500
    for what, response in responses.items():
        for name, value in EXPECTED_HEADERS.items():
            assert response.headers.get(name) == value, (what, name, response.headers)
        # No TLS configured, so no HSTS: a browser would refuse plain HTTP for a year.
        assert "Strict-Transport-Security" not in response.headers, what


@pytest.mark.parametrize("extra_config", [{"HSTS_SECONDS": 31536000}])
def test_hsts_only_when_configured(client):
    response = client.get("/healthz")
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"


# --- input the database cannot take -------------------------------------------------------------


def test_input_the_database_cannot_store_is_a_clear_4xx(app, client, auth):
    """NUL characters (PostgreSQL text refuses them) and ids beyond the id columns: 4xx, not 500."""
    headers = auth.headers("nul-user")
    conversation = client.post("/api/v1/conversations", json={"title": "kept"}, headers=headers).get_json()
    url = f"/api/v1/conversations/{conversation['id']}"
    api_cases = [
        ("PATCH", url, {"title": "a\x00b"}, "title"),
        ("PATCH", url, {"title": " \n "}, "title"),
        ("POST", url + "/messages", {"content": "hi\x00"}, "content"),
        ("POST", "/api/v1/tokens", {"username": "nul\x00user", "password": "whatever"}, "username"),
        ("POST", "/api/v1/tokens", {"username": "nul-user", "password": PASSWORD, "name": "\x00"}, "name"),
    ]
    for method, target, body, field in api_cases:
        response = client.open(target, method=method, json=body, headers=headers)
        assert response.status_code == 422, (target, body, response.get_data(as_text=True))
        assert field in response.get_json()["error"]["message"]
    refused = client.get("/api/v1/conversations?cursor=%00", headers=headers)
    assert refused.status_code == 422 and refused.get_json()["error"]["code"] == "invalid"

    browser, _csrf = log_in(app, "nul-user")
    for target, form in [
        (f"/c/{conversation['id']}/rename", {"title": "a\x00b"}),
        (f"/c/{conversation['id']}/messages", {"content": "\x00"}),
        ("/settings/tokens", {"name": "\x00"}),
    ]:
        page = browser.post(target, data=form)
        assert page.status_code == 422 and page.mimetype == "text/html", (target, page.status_code)
    assert app.test_client().post("/login", data={"username": "x\x00", "password": "y"}).status_code == 422

    for too_big in ("2147483648", "99999999999999999999999"):
        assert client.get(f"/api/v1/conversations/{too_big}", headers=headers).status_code == 404
        assert browser.get(f"/c/{too_big}").status_code == 404
    # None of it wrote anything.
    assert client.get(url, headers=headers).get_json()["title"] == "kept"
    assert client.get(url + "/messages", headers=headers).get_json()["items"] == []
    assert count(app, ApiToken) == 1


# --- rate limits -------------------------------------------------------------------------------

LIMITS = {
    "RATELIMIT_ENABLED": True,
    "RATELIMIT_TOKENS": "3 per minute",
    "RATELIMIT_REGISTER": "2 per minute",
    "RATELIMIT_LOGIN": "3 per minute",
}


def assert_429(response):
    assert response.status_code == 429, response.get_data(as_text=True)
    assert int(response.headers["Retry-After"]) >= 1
    return response


@pytest.mark.parametrize("extra_config", [LIMITS])
def test_token_requests_are_limited_per_address(app, client, auth):
    auth.register("limited")
    good = {"username": "limited", "password": PASSWORD}
    assert client.post("/api/v1/tokens", json={**good, "password": "wrong-one"}).status_code == 401
    assert client.post("/api/v1/tokens", json=good).status_code == 201
    assert client.post("/api/v1/tokens", json=good).status_code == 201
    refused = assert_429(client.post("/api/v1/tokens", json=good))
    assert refused.get_json() == {
        "error": {
            "code": "too_many_requests",
            "message": "too many requests (limit: 3 per 1 minute); retry after Retry-After seconds",
        }
    }
    assert count(app, ApiToken) == 2  # the refused request wrote nothing
    # Another address has its own allowance; other routes are not limited.
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "10.9.8.7"
    assert other.post("/api/v1/tokens", json=good).status_code == 201
    token = other.post("/api/v1/tokens", json=good).get_json()["token"]
    for _ in range(5):
        assert client.get("/api/v1/conversations", headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.mark.parametrize("extra_config", [LIMITS])
def test_registration_is_limited(app, client):
    for name in ("reg-one", "reg-two"):
        assert client.post("/api/v1/users", json={"username": name, "password": PASSWORD}).status_code == 201
    refused = assert_429(client.post("/api/v1/users", json={"username": "reg-three", "password": PASSWORD}))
    assert refused.get_json()["error"]["code"] == "too_many_requests"
    assert count(app, User) == 2
    # The browser's registration form has its own count of the same limit.
    form = {"username": "web-one", "password": PASSWORD, "confirm": PASSWORD}
    assert client.post("/register", data=form).status_code == 302
    client.post("/logout")
    assert client.post("/register", data={**form, "username": "web-two"}).status_code == 302
    client.post("/logout")
    page = assert_429(client.post("/register", data={**form, "username": "web-three"}))
    assert page.mimetype == "text/html" and "too many requests" in page.get_data(as_text=True).lower()
    assert count(app, User) == 4


@pytest.mark.parametrize("extra_config", [LIMITS])
def test_browser_login_is_limited_with_a_page_not_json(app, client, auth):
    auth.register("browser")
    for _ in range(3):
        assert client.post("/login", data={"username": "browser", "password": "wrong-pass"}).status_code == 401
    page = assert_429(client.post("/login", data={"username": "browser", "password": PASSWORD}))
    assert page.mimetype == "text/html"
    body = page.get_data(as_text=True).lower()
    assert "too many requests" in body and "traceback" not in body
    # Showing the form is not limited, and the refused login did not log in.
    assert client.get("/login").status_code == 200
    assert client.get("/").status_code == 302


def from_address(app, address: str):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


@pytest.mark.parametrize("extra_config", [{"RATELIMIT_ENABLED": True, "RATELIMIT_LOGIN_USERNAME": "3 per minute"}])
def test_login_guesses_are_limited_per_username_from_any_address(app, client, auth):
    """Guesses at one account spread over many addresses (each far below its own limit) and
    over both doors, the login form and POST /api/v1/tokens, share one count."""
    auth.register("victim")
    auth.register("bystander")
    wrong = {"username": "victim", "password": "wrong-pass"}
    assert from_address(app, "203.0.113.1").post("/api/v1/tokens", json=wrong).status_code == 401
    assert from_address(app, "203.0.113.2").post("/login", data=wrong).status_code == 401
    # Case does not make another username for the count.
    assert (
        from_address(app, "203.0.113.3").post("/api/v1/tokens", json={**wrong, "username": "VICTIM"}).status_code == 401
    )

    refused = assert_429(
        from_address(app, "203.0.113.4").post("/api/v1/tokens", json={"username": "victim", "password": PASSWORD})
    )
    assert refused.get_json() == {
        "error": {
            "code": "too_many_requests",
            "message": "too many requests (limit: 3 per 1 minute); retry after Retry-After seconds",
        }
    }
    page = assert_429(
        from_address(app, "203.0.113.5").post("/login", data={"username": "Victim", "password": PASSWORD})
    )
    html = page.get_data(as_text=True)
    assert page.mimetype == "text/html" and '<form method="post" class="stack">' in html  # the login page
    assert "Too many requests to log in (limit: 3 per 1 minute). Wait a minute, then try again." in html
    assert count(app, ApiToken) == 0 and count(app, LoginSession) == 0  # refused: nothing written

    # Another username is not held back, even from an address that took part; and its own
    # successful logins do not count: only failures use up a username's allowance.
    bystander = {"username": "bystander", "password": PASSWORD}
    for address in ("203.0.113.1", "203.0.113.6", "203.0.113.7"):
        assert from_address(app, address).post("/api/v1/tokens", json=bystander).status_code == 201
    assert from_address(app, "203.0.113.2").post("/login", data=bystander).status_code == 302
    assert (
        from_address(app, "203.0.113.8")
        .post("/api/v1/tokens", json={**bystander, "password": "wrong-pass"})
        .status_code
        == 401
    )
    # A body naming no username is counted by its address instead.
    nameless = from_address(app, "203.0.113.9")
    statuses = [nameless.post("/api/v1/tokens", json={"password": "x"}).status_code for _ in range(4)]
    assert statuses == [422, 422, 422, 429]
    assert from_address(app, "203.0.113.10").post("/api/v1/tokens", json={"password": "x"}).status_code == 422


def test_limits_are_off_when_disabled(client, auth):
    """The base test config turns them off (conftest); nothing is counted then."""
    auth.register("unlimited")
    for _ in range(15):
        assert client.post("/api/v1/tokens", json={"username": "unlimited", "password": PASSWORD}).status_code == 201


@pytest.mark.parametrize(
    "extra_config, shared",
    [({**LIMITS, "PROXY_FIX_X_FOR": 1}, False), (LIMITS, True)],
    ids=["behind-proxy", "direct"],
)
def test_forwarded_for_counts_only_behind_a_trusted_proxy(client, auth, shared):
    auth.register("proxied")
    good = {"username": "proxied", "password": PASSWORD}
    statuses = [
        client.post("/api/v1/tokens", json=good, headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
        for n in range(5)
    ]
    # Directly exposed, a client cannot dodge the limit by inventing X-Forwarded-For;
    # behind the one proxy that sets it, each real client has its own count.
    assert statuses == ([201, 201, 201, 429, 429] if shared else [201] * 5)


@pytest.mark.parametrize("extra_config", [{**LIMITS, "RATELIMIT_STORAGE_URI": f"redis://127.0.0.1:{free_port()}"}])
def test_limits_hold_in_memory_while_redis_is_down(client, auth):
    """Nothing listens at the Redis address: requests are neither failed nor let through unlimited."""
    auth.register("no-redis")
    good = {"username": "no-redis", "password": PASSWORD}
    statuses = [client.post("/api/v1/tokens", json=good).status_code for _ in range(4)]
    assert statuses == [201, 201, 201, 429]


def test_a_new_app_counts_in_its_own_storage_after_another_fell_back_to_memory(database_uri, tmp_path):
    """One process can create several apps (tests do; so does a factory called twice).

    An app whose Redis was down left Flask-Limiter's shared extension object "falling back":
    the next app then counted its first requests in a throwaway memory store and the rest,
    after the backend check a second or two later, in its own, so its limit let more through.
    """
    from chatapp import create_app
    from tests.conftest import base_test_config

    def make_app(config: dict):
        app = create_app({**base_test_config(database_uri), **LIMITS, **config})
        app.instance_path = str(tmp_path / "instance")
        return app

    def dispose(app):
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()

    unreachable = make_app({"RATELIMIT_STORAGE_URI": f"redis://127.0.0.1:{free_port()}"})
    AuthActions(unreachable.test_client()).register("fell-back")
    for _ in range(2):  # the first falls back to memory, the second finds Redis still down
        unreachable.test_client().post("/api/v1/tokens", json={"username": "fell-back", "password": PASSWORD})
    dispose(unreachable)

    app = make_app({"RATELIMIT_STORAGE_URI": "memory://"})
    client = app.test_client()
    good = {"username": "fell-back", "password": PASSWORD}
    statuses = [client.post("/api/v1/tokens", json=good).status_code for _ in range(2)]
    time.sleep(2.2)  # past Flask-Limiter's first backoffs before it checks a dead storage again
    statuses += [client.post("/api/v1/tokens", json=good).status_code for _ in range(2)]
    dispose(app)
    assert statuses == [201, 201, 201, 429]


# Per user, on the work that costs. The per-address limits stay at their defaults, loose
# enough for the few registrations and log-ins these tests make from one address.
USER_LIMITS = {
    "RATELIMIT_ENABLED": True,
    "RATELIMIT_MESSAGES": "3 per minute",
    "RATELIMIT_CONVERSATIONS": "2 per minute",
    "RATELIMIT_REGENERATE": "2 per minute",
}


def assert_limited_per_user(response, limit: str):
    assert_429(response)
    assert response.get_json() == {
        "error": {
            "code": "too_many_requests",
            "message": f"too many requests (limit: {limit}); retry after Retry-After seconds",
        }
    }


def assert_limited_page(response):
    assert_429(response)
    body = response.get_data(as_text=True).lower()
    assert response.mimetype == "text/html" and "too many requests" in body and "traceback" not in body


def message_total(app) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Message))


def api_message(client, headers, conversation_id: int, content: str = "hello"):
    response = client.post(
        f"/api/v1/conversations/{conversation_id}/messages", json={"content": content}, headers=headers
    )
    wait_for_background_work(client.application)  # the reply ends before the next post
    return response


@pytest.mark.parametrize("extra_config", [USER_LIMITS])
def test_messages_are_limited_per_user_through_the_api_and_the_browser_alike(app, client, auth):
    headers = auth.headers("chatty")
    conversation_id = client.post("/api/v1/conversations", json={}, headers=headers).get_json()["id"]
    browser, _csrf = log_in(app, "chatty")
    assert api_message(client, headers, conversation_id).status_code == 202
    assert browser.post(f"/c/{conversation_id}/messages", data={"content": "from the form"}).status_code == 302
    wait_for_background_work(app)
    assert api_message(client, headers, conversation_id).status_code == 202
    # Three messages, whichever way they came: the fourth is refused both ways.
    before = count(app, Message)
    assert_limited_per_user(api_message(client, headers, conversation_id), "3 per 1 minute")
    assert_limited_page(browser.post(f"/c/{conversation_id}/messages", data={"content": "one more"}))
    assert count(app, Message) == before  # the refused posts wrote nothing
    # The count is the user's, not the address's: from elsewhere the user is still refused,
    # and another user at the same address is not.
    elsewhere = app.test_client()
    elsewhere.environ_base["REMOTE_ADDR"] = "10.9.8.7"
    assert api_message(elsewhere, headers, conversation_id).status_code == 429
    other = auth.headers("quiet")
    other_conversation = client.post("/api/v1/conversations", json={}, headers=other).get_json()["id"]
    assert api_message(client, other, other_conversation).status_code == 202
    # Reading is not limited.
    for _ in range(5):
        assert client.get(f"/api/v1/conversations/{conversation_id}/messages", headers=headers).status_code == 200


@pytest.mark.parametrize("extra_config", [USER_LIMITS])
def test_new_conversations_are_limited_per_user_through_the_api_and_the_browser_alike(app, client, auth):
    headers = auth.headers("founder")
    browser, _csrf = log_in(app, "founder")
    assert client.post("/api/v1/conversations", json={}, headers=headers).status_code == 201
    assert browser.post("/chat/new", data={"content": "hello"}).status_code == 302
    assert_limited_per_user(client.post("/api/v1/conversations", json={}, headers=headers), "2 per 1 minute")
    assert_limited_page(browser.post("/chat/new", data={"content": "hello again"}))
    assert count(app, Conversation) == 2
    # Renaming one is not limited.
    conversation_id = client.get("/api/v1/conversations", headers=headers).get_json()["items"][0]["id"]
    for n in range(4):
        renamed = client.patch(f"/api/v1/conversations/{conversation_id}", json={"title": f"t{n}"}, headers=headers)
        assert renamed.status_code == 200


@pytest.mark.parametrize("extra_config", [USER_LIMITS])
def test_regenerating_is_limited_per_user_through_the_api_and_the_browser_alike(app, client, auth):
    headers = auth.headers("regen")
    browser, _csrf = log_in(app, "regen")
    conversation_id = client.post("/api/v1/conversations", json={}, headers=headers).get_json()["id"]
    reply_id = api_message(client, headers, conversation_id).get_json()["reply"]["id"]
    url = f"/api/v1/conversations/{conversation_id}/messages/{reply_id}/regenerate"
    regenerated = client.post(url, headers=headers)
    assert regenerated.status_code == 202
    wait_for_background_work(app)
    # Each regeneration is a new version; the latest one is regenerated next.
    version_id = regenerated.get_json()["id"]
    assert browser.post(f"/c/{conversation_id}/messages/{version_id}/regenerate").status_code == 302
    wait_for_background_work(app)
    latest_id = version_id + 1
    before = message_total(app)
    url = f"/api/v1/conversations/{conversation_id}/messages/{latest_id}/regenerate"
    assert_limited_per_user(client.post(url, headers=headers), "2 per 1 minute")
    assert_limited_page(browser.post(f"/c/{conversation_id}/messages/{latest_id}/regenerate"))
    assert message_total(app) == before == 4  # the message and three versions: none added
    # A regeneration is not a message: the user may still post.
    assert api_message(client, headers, conversation_id).status_code == 202


def _redis_or_skip(url: str):
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis at {url} is unreachable: {exc}")
    return client


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["address", "username"])
@pytest.mark.parametrize("storage", ["redis", "memory"])
def test_two_hosts_share_limits_through_redis(database_uri, tmp_path, storage, limit):
    """Two servers (two hosts) on one database: Redis makes them one door, memory does not,
    for the limit per address, the one per username and the per-user ones alike."""
    redis_url = "redis://127.0.0.1:6379"
    prefix = f"chatapp-test-{secrets.token_hex(4)}"
    config = {
        "RATELIMIT_ENABLED": "true",
        "RATELIMIT_TOKENS": "3 per minute" if limit == "address" else "100 per minute",
        "RATELIMIT_LOGIN_USERNAME": "3 per minute" if limit == "username" else "100 per minute",
        "RATELIMIT_CONVERSATIONS": "3 per minute",
        "RATELIMIT_KEY_PREFIX": prefix,
        "RATELIMIT_STORAGE_URI": redis_url if storage == "redis" else "memory://",
    }
    redis_client = _redis_or_skip(redis_url) if storage == "redis" else None
    try:
        with (
            GunicornServer(database_uri, workers=1, threads=2, config=config, log_dir=tmp_path) as one,
            GunicornServer(database_uri, workers=1, threads=2, config=config, log_dir=tmp_path) as two,
        ):
            credentials = {"username": "two-hosts", "password": PASSWORD}
            assert requests.post(one.url + "/api/v1/users", json=credentials, timeout=30).status_code == 201
            if limit == "username":
                # Only failed logins count against a username: take a token first (not
                # counted), then guess.
                token = requests.post(one.url + "/api/v1/tokens", json=credentials, timeout=30).json()["token"]
                attempt, allowed = {**credentials, "password": "wrong-pass"}, 401
            else:
                attempt, allowed = credentials, 201
            answers = [
                requests.post(server.url + "/api/v1/tokens", json=attempt, timeout=30)
                for server in (one, one, two, two, one, one)
            ]
            statuses = [response.status_code for response in answers]
            if limit != "username":
                token = answers[0].json()["token"]
            headers = {"Authorization": f"Bearer {token}"}
            user_statuses = [
                requests.post(server.url + "/api/v1/conversations", json={}, headers=headers, timeout=30).status_code
                for server in (one, one, two, two, one, one)
            ]
            if limit == "username":  # the same address, another username: not held back
                other = {"username": "other-user", "password": PASSWORD}
                assert requests.post(two.url + "/api/v1/users", json=other, timeout=30).status_code == 201
                assert requests.post(two.url + "/api/v1/tokens", json=other, timeout=30).status_code == 201
    finally:
        if redis_client is not None:
            keys = list(redis_client.scan_iter(match=f"*{prefix}*"))
            if keys:
                redis_client.delete(*keys)
            redis_client.close()
    if storage == "redis":
        assert statuses == [allowed] * 3 + [429] * 3
        assert user_statuses == [201] * 3 + [429] * 3
    else:  # each host counts alone: the fourth request on host one is its first refusal
        assert statuses == [allowed] * 5 + [429]
        assert user_statuses == [201] * 5 + [429]


# --- the URL-map walk: no id reaches another user's data -----------------------------------------------

ARGUMENT = re.compile(r"<(?:(?P<converter>\w+)(?:\([^)]*\))?:)?(?P<name>\w+)>")
# Some answer other than 404 is right only where listed here, with the reason.
EXPECTED_OTHERWISE: dict[tuple[str, str], int] = {}


def id_rules(app):
    """Every rule with an <int:...> argument, and the names of those arguments."""
    for rule in app.url_map.iter_rules():
        ids = [m["name"] for m in ARGUMENT.finditer(rule.rule) if m["converter"] == "int"]
        if ids:
            yield rule, ids


def fill(rule: str, values: dict) -> str:
    return ARGUMENT.sub(lambda m: str(values[m["name"]]), rule)


def openapi_path(rule: str) -> str:
    return ARGUMENT.sub(lambda m: "{" + m["name"] + "}", rule)


def sample_body(spec: dict, rule: str, method: str) -> dict | None:
    """A valid JSON body for an API operation, made from its OpenAPI request schema."""
    operation = spec["paths"].get(openapi_path(rule), {}).get(method.lower(), {})
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if content is None:
        return None
    schema = content["schema"]
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    samples = {"string": "probe text", "integer": 1, "boolean": True}
    return {
        name: samples[prop.get("type", "string")]
        for name, prop in schema.get("properties", {}).items()
        if not prop.get("readOnly")
    }


class Owner:
    """A user with a conversation, a message, a finished reply and a token, seen through the API."""

    def __init__(self, app, client, username: str):
        self.marker = f"SECRET-{username}-{secrets.token_hex(6)}"
        client.post("/api/v1/users", json={"username": username, "password": PASSWORD})
        token = client.post("/api/v1/tokens", json={"username": username, "password": PASSWORD}).get_json()
        self.headers = {"Authorization": f"Bearer {token['token']}"}
        self.token_prefix = token["prefix"]
        conversation = client.post(
            "/api/v1/conversations", json={"title": f"title {self.marker}"}, headers=self.headers
        ).get_json()
        posted = client.post(
            f"/api/v1/conversations/{conversation['id']}/messages",
            json={"content": f"message {self.marker}"},
            headers=self.headers,
        ).get_json()
        assert app.extensions["chatapp.reply_runner"].wait_idle(30)
        # A browser login too, whose login session another user must not be able to end.
        assert app.test_client().post("/login", data={"username": username, "password": PASSWORD}).status_code == 302
        with unit_of_work(app, write=False) as session:
            session_id = session.scalar(
                sa.select(sa.func.max(LoginSession.id)).join(User).where(User.username == username)
            )
        self.ids = {
            "conversation_id": conversation["id"],
            "message_id": posted["message"]["id"],
            "reply_id": posted["reply"]["id"],
            "token_id": token["id"],
            "session_id": session_id,
        }
        self.username = username

    def snapshot(self, app) -> list:
        """Everything this user has, straight from the database."""
        with unit_of_work(app, write=False) as session:
            user_id = session.scalar(sa.select(User.id).where(User.username == self.username))
            rows = session.execute(
                sa.select(
                    Conversation.id, Conversation.title, Message.id, Message.content, Message.status, Message.attempt
                )
                .join(Message, Message.conversation_id == Conversation.id)
                .where(Conversation.owner_id == user_id)
                .order_by(Message.id)
            ).all()
            tokens = session.execute(
                sa.select(ApiToken.id, ApiToken.revoked_at).where(ApiToken.user_id == user_id).order_by(ApiToken.id)
            ).all()
            logins = session.execute(
                sa.select(LoginSession.id).where(LoginSession.user_id == user_id).order_by(LoginSession.id)
            ).all()
        return [tuple(r) for r in rows] + [tuple(t) for t in tokens] + [tuple(s) for s in logins]


def log_in(app, username: str):
    """A browser logged in through the login form, and the CSRF token its pages carry."""
    browser = app.test_client()
    response = browser.post("/login", data={"username": username, "password": PASSWORD})
    assert response.status_code == 302, response.get_data(as_text=True)
    page = browser.get("/").get_data(as_text=True)
    csrf_token = re.search(r'<meta name="csrf-token" content="([^"]+)"', page).group(1)
    return browser, {"X-CSRFToken": csrf_token}


def test_no_route_with_an_id_reaches_another_users_data(app, client):
    owner = Owner(app, client, "owner-a")
    intruder = Owner(app, client, "intruder-b")
    before = owner.snapshot(app)
    browser, csrf = log_in(app, intruder.username) if "web.login" in app.view_functions else (None, {})
    spec = client.get("/api/v1/openapi.json").get_json()

    rules = list(id_rules(app))
    assert any(rule.rule.startswith("/api/") for rule, _ids in rules)
    walked = []
    for rule, ids in rules:
        unknown = [name for name in ids if name not in owner.ids]
        assert not unknown, f"{rule.rule}: teach this test which of the owner's ids to use for {unknown}"
        # Every mix of the owner's ids and the intruder's own, with at least one of the owner's.
        for mine in itertools.product((False, True), repeat=len(ids)):
            if all(mine):
                continue
            values = {name: (intruder if own else owner).ids[name] for name, own in zip(ids, mine, strict=True)}
            url = fill(rule.rule, values)
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                if rule.rule.startswith("/api/"):
                    body = sample_body(spec, rule.rule, method)
                    callers = [("token", client, intruder.headers)]
                    if browser is not None:  # the API also takes the login cookie
                        callers.append(("cookie", browser, csrf))
                    requests_ = [(how, c, dict(json=body, headers=h)) for how, c, h in callers]
                else:
                    if browser is None:
                        pytest.fail(f"{rule.rule} is a browser route but there is no web login to use")
                    form = {"title": "probe text", "content": "probe text", "name": "probe text"}
                    requests_ = [("cookie", browser, dict(data=form))]
                for how, caller, kwargs in requests_:
                    response = caller.open(url, method=method, **kwargs)
                    text = response.get_data(as_text=True)
                    expected = EXPECTED_OTHERWISE.get((rule.endpoint, method), 404)
                    assert response.status_code == expected, (method, url, how, response.status_code, text[:300])
                    assert owner.marker not in text and owner.token_prefix not in text, (method, url, how)
                    walked.append((method, rule.rule, how))
    # Nothing the intruder tried changed anything of the owner's.
    assert owner.snapshot(app) == before
    assert client.get("/api/v1/conversations", headers=owner.headers).status_code == 200
    print(f"\nURL-map walk: {len(walked)} calls over {len(rules)} rules, all 404")
