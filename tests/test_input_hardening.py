"""Hostile input is refused quickly with a 4xx, never a 500 or a frozen worker.

Text validators that could backtrack, cursors and stream positions beyond what the database
can bind, numbers written in other scripts' digits, and ``next`` targets that cannot be put in
a header.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import signal

import pytest
import sqlalchemy as sa

from chatapp.api.schemas import NO_NUL_PATTERN, VISIBLE_TEXT_PATTERN, no_nul, visible_text
from chatapp.chat.models import Conversation, Message
from chatapp.db import unit_of_work
from tests.helpers import start_conversation
from tests.support.sse import iter_events
from tests.test_security import log_in

# --- validators that run in linear time ----------------------------------------------------------


class TookTooLong(BaseException):
    """Raised into the test when its time is up (a BaseException, so no handler swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Interrupt the block after ``seconds``.

    `re` checks for signals while it backtracks, so a runaway match is cut short here
    instead of holding the test (and the GIL) for hours.
    """

    def interrupt(signum, frame):
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# About 1 MB (the largest body accepted): words and spaces, then the NUL that made the old
# pattern ^[^\0]*[^\s\0][^\0]*$ try every split of the text (minutes; this bound is generous).
HOSTILE_TEXT = ("x" * 1000 + " " * 1000) * 500 + "\x00"
GENEROUS_SECONDS = 5


def stored(app) -> tuple[int, int]:
    with unit_of_work(app, write=False) as session:
        return (
            session.scalar(sa.select(sa.func.count()).select_from(Conversation)),
            session.scalar(sa.select(sa.func.count()).select_from(Message)),
        )


def test_hostile_text_to_the_api_is_refused_quickly(app, client, auth):
    headers = auth.headers("redos-api")
    conversation = client.post("/api/v1/conversations", json={"title": "kept"}, headers=headers).get_json()
    url = f"/api/v1/conversations/{conversation['id']}"
    before = stored(app)
    cases = [
        ("POST", "/api/v1/conversations", {"title": HOSTILE_TEXT}, "title"),
        ("PATCH", url, {"title": HOSTILE_TEXT}, "title"),
        ("POST", url + "/messages", {"content": HOSTILE_TEXT}, "content"),
        ("POST", "/api/v1/tokens", {"username": HOSTILE_TEXT, "password": "whatever"}, "username"),
    ]
    for method, target, body, field in cases:
        with time_limit(GENEROUS_SECONDS):
            response = client.open(target, method=method, json=body, headers=headers)
        assert response.status_code == 422, (target, response.get_data(as_text=True)[:300])
        error = response.get_json()["error"]
        assert error["code"] == "invalid" and f"'{field}'" in error["message"], (target, error)
    assert stored(app) == before
    assert client.get(url, headers=headers).get_json()["title"] == "kept"


def test_hostile_text_to_the_web_forms_is_refused_quickly(app, client, auth):
    auth.register("redos-web")
    browser, _csrf = log_in(app, "redos-web")
    conversation_id = start_conversation(browser)
    before = stored(app)
    # Form bodies are capped lower than JSON (Flask's MAX_FORM_MEMORY_SIZE, 500 kB).
    text = HOSTILE_TEXT[-400_000:]
    for target, form in [
        (f"/c/{conversation_id}/messages", {"content": text}),
        (f"/c/{conversation_id}/rename", {"title": text}),
    ]:
        with time_limit(GENEROUS_SECONDS):
            page = browser.post(target, data=form)
        assert page.status_code == 422 and page.mimetype == "text/html", (target, page.status_code)
    assert stored(app) == before


@pytest.mark.parametrize(
    "text",
    [
        "a",
        " a ",
        "\n\tb\n",
        "\u00a0x",
        "x\u2028",
        "a\x00",
        "\x00a",
        " ",
        "\u3000\u00a0\n",
        "\x00",
        "",
        "a b\x00 c",
        "\x1c\u0085",
        "\ufeff",
    ],
)
def test_the_documented_patterns_say_what_the_validators_do(text):
    """The OpenAPI document shows the rules as patterns; they agree with the plain checks."""

    def accepts(check) -> bool:
        try:
            check(text)
        except Exception:  # noqa: BLE001 - marshmallow's ValidationError
            return False
        return True

    assert accepts(visible_text) == bool(re.search(VISIBLE_TEXT_PATTERN, text))
    assert accepts(no_nul) == bool(re.search(NO_NUL_PATTERN, text))


# --- server-sent events: a reply's text cannot forge events ------------------------------------


def browser_events(body: str) -> list[tuple[str, str, str]]:
    """(event, data, last event id) as a browser's EventSource dispatches them."""
    return [(event.name, event.data, event.id or "") for event in iter_events([body])]


FORGERY = 'a\rdata: x\r\revent: done\rdata: {}\r\rid: 9:9\r\r\nevent: done\r\ndata: {"status": "failed"}\r\n\r\nb'


def test_a_reply_cannot_forge_events_or_move_last_event_id(app, client, auth):
    """The echo bot repeats a message full of CRs; the browser sees text, then one real done."""
    headers = auth.headers("sse-forger")
    conversation = client.post("/api/v1/conversations", json={}, headers=headers).get_json()
    url = f"/api/v1/conversations/{conversation['id']}/messages"
    posted = client.post(url, json={"content": FORGERY}, headers=headers)
    assert posted.status_code == 202, posted.get_data(as_text=True)
    reply_id = posted.get_json()["reply"]["id"]
    assert app.extensions["chatapp.reply_runner"].wait_idle(30)

    response = client.get(f"{url}/{reply_id}/stream", headers=headers)
    assert response.status_code == 200
    events = browser_events(response.get_data(as_text=True))
    names = [name for name, _data, _id in events]
    assert names.count("done") == 1 and names[-1] == "done", names
    assert set(names[:-1]) == {"message"}, names
    assert json.loads(events[-1][1]) == {"status": "complete", "error": None}
    # The text the client puts together is the reply, its line breaks made LF; every id is
    # one the server set: attempt 0, offsets into the stored text.
    text = "".join(data for name, data, _id in events if name == "message")
    assert text == FORGERY.replace("\r\n", "\n").replace("\r", "\n")
    assert events[-1][2] == f"0:{len(FORGERY)}"
    assert all(re.fullmatch(r"0:\d+", event_id) for _name, _data, event_id in events)
    # The stored reply keeps the text as written.
    stored_reply = client.get(url, headers=headers).get_json()["items"][-1]
    assert stored_reply["content"] == FORGERY and stored_reply["status"] == "complete"


@pytest.mark.parametrize("field", ["event", "event_id"])
@pytest.mark.parametrize("value", ["done\ndata: x", "done\revent: x", "1:2\r\n", "1\x002"])
def test_event_names_and_ids_cannot_carry_line_breaks(field, value):
    from chatapp.chat.stream import _event

    with pytest.raises(ValueError):
        _event("text", **{field: value})


# --- numbers from clients: cursors, Last-Event-ID, ?before= -----------------------------------


def cursor_of(raw: str) -> str:
    """A cursor as the API encodes one (URL-safe base64, no padding) around ``raw``."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# Beyond any id column, other scripts' digits (str.isdigit() says yes to both), and what int()
# takes but no id is written as.
BAD_NUMBERS = ["99999999999999999999999", "2147483648", "²", "１２", "٣", "-1", "+1", " 1", "1_0", "9" * 5000]


@pytest.fixture
def owner(app, client, auth):
    headers = auth.headers("numbers")
    conversation = client.post("/api/v1/conversations", json={"title": "kept"}, headers=headers).get_json()
    return headers, conversation["id"]


def assert_cursor_refused(response):
    assert response.status_code == 422, response.get_data(as_text=True)[:300]
    error = response.get_json()["error"]
    assert error["code"] == "invalid" and "cursor" in error["message"], error


@pytest.mark.parametrize("number", BAD_NUMBERS)
def test_a_message_cursor_beyond_an_id_or_in_other_digits_is_a_422(client, owner, number):
    headers, conversation_id = owner
    response = client.get(
        f"/api/v1/conversations/{conversation_id}/messages",
        query_string={"cursor": cursor_of(number)},
        headers=headers,
    )
    assert_cursor_refused(response)


@pytest.mark.parametrize("number", BAD_NUMBERS)
def test_a_conversation_cursor_beyond_an_id_or_in_other_digits_is_a_422(client, owner, number):
    headers, _conversation_id = owner
    response = client.get(
        "/api/v1/conversations",
        query_string={"cursor": cursor_of(f"2026-01-01T00:00:00+00:00|{number}")},
        headers=headers,
    )
    assert_cursor_refused(response)


@pytest.mark.parametrize(
    "stamp", ["9999-12-31T23:59:59.999999+00:00", "0001-01-01T00:00:00+00:00", "2026-01-01T00:00:00", "2026-01-01"]
)
def test_a_conversation_cursor_at_any_valid_time_pages(client, owner, stamp):
    headers, _conversation_id = owner
    response = client.get("/api/v1/conversations", query_string={"cursor": cursor_of(f"{stamp}|1")}, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)[:300]


def test_the_largest_ids_still_page(client, owner):
    """The bound is the id column's: 2**31 - 1 itself is a valid (empty) position."""
    headers, conversation_id = owner
    for url, raw in [
        (f"/api/v1/conversations/{conversation_id}/messages", "2147483647"),
        ("/api/v1/conversations", "2026-01-01T00:00:00+00:00|2147483647"),
    ]:
        response = client.get(url, query_string={"cursor": cursor_of(raw)}, headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)[:300]


@pytest.mark.parametrize(
    "last_event_id",
    [
        "1:99999999999999999999",
        "99999999999999999999:1",
        "１:2",
        "1:２",
        "²:1",
        "0:2147483647",
        "0",
        "0:",
        ":0",
        "a:b",
        "0:-1",
        "0:" + "9" * 5000,
    ],
)
def test_a_bad_last_event_id_is_a_400(app, client, owner, last_event_id):
    headers, conversation_id = owner
    url = f"/api/v1/conversations/{conversation_id}/messages"
    reply_id = client.post(url, json={"content": "resume me"}, headers=headers).get_json()["reply"]["id"]
    assert app.extensions["chatapp.reply_runner"].wait_idle(30)
    response = client.get(f"{url}/{reply_id}/stream", headers={**headers, "Last-Event-ID": last_event_id})
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    error = response.get_json()["error"]
    assert error["code"] == "bad_request" and "Last-Event-ID" in error["message"]


def test_the_largest_last_event_id_still_streams(app, client, owner):
    """An offset past the text is a valid resume point: the stream just ends."""
    headers, conversation_id = owner
    url = f"/api/v1/conversations/{conversation_id}/messages"
    reply_id = client.post(url, json={"content": "resume me"}, headers=headers).get_json()["reply"]["id"]
    assert app.extensions["chatapp.reply_runner"].wait_idle(30)
    response = client.get(f"{url}/{reply_id}/stream", headers={**headers, "Last-Event-ID": "0:2147483646"})
    assert response.status_code == 200
    events = browser_events(response.get_data(as_text=True))
    assert [name for name, _data, _id in events] == ["done"]


@pytest.mark.parametrize("before", ["99999999999999999999", "2147483648", "²", "１２", "-1", "9" * 5000])
def test_a_bad_before_on_the_conversation_page_shows_the_newest_messages(app, client, auth, before):
    auth.register("before-user")
    browser, _csrf = log_in(app, "before-user")
    conversation_id = start_conversation(browser)
    browser.post(f"/c/{conversation_id}/messages", data={"content": "the newest words"})
    assert app.extensions["chatapp.reply_runner"].wait_idle(30)
    page = browser.get(f"/c/{conversation_id}", query_string={"before": before})
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "the newest words" in page.get_data(as_text=True)


def test_a_bad_sidebar_cursor_is_a_page_not_a_500(app, auth):
    auth.register("older-user")
    browser, _csrf = log_in(app, "older-user")
    for raw in ["2026-01-01T00:00:00+00:00|99999999999999999999", "2026-01-01T00:00:00+00:00|²"]:
        page = browser.get("/", query_string={"older": cursor_of(raw)})
        assert page.status_code == 422 and page.mimetype == "text/html", page.status_code


@pytest.mark.parametrize(
    "target", ["/\x01x", "/a\nb", "/a\r\nSet-Cookie: x=1", "/\t/evil.example", "/a\x7fb", "/a\x85b"]
)
def test_login_drops_a_next_with_control_characters(app, auth, target):
    auth.register("next-user")
    browser = app.test_client()
    response = browser.post(
        "/login", query_string={"next": target}, data={"username": "next-user", "password": "correct horse"}
    )
    assert response.status_code == 302 and response.headers["Location"] == "/", response.headers.get("Location")
    # Already logged in, the login page sends you on the same way.
    again = browser.get("/login", query_string={"next": target})
    assert again.status_code == 302 and again.headers["Location"] == "/"


def test_login_still_follows_a_plain_next(app, auth):
    auth.register("next-plain")
    response = app.test_client().post(
        "/login", query_string={"next": "/c/1?older=abc"}, data={"username": "next-plain", "password": "correct horse"}
    )
    assert response.headers["Location"] == "/c/1?older=abc"
