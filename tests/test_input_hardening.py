"""Hostile input is refused quickly with a 4xx, never a 500 or a frozen worker.

Text validators that could backtrack, cursors and stream positions beyond what the database
can bind, numbers written in other scripts' digits, and ``next`` targets that cannot be put in
a header.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal

import pytest
import sqlalchemy as sa

from chatapp.api.schemas import NO_NUL_PATTERN, VISIBLE_TEXT_PATTERN, no_nul, visible_text
from chatapp.chat.models import Conversation, Message
from chatapp.db import unit_of_work
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
    conversation_id = browser.post("/c").headers["Location"].rsplit("/", 1)[1]
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
    ["a", " a ", "\n\tb\n", "\u00a0x", "x\u2028", "a\x00", "\x00a", " ", "\u3000\u00a0\n", "\x00", "", "a b\x00 c"],
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
    """(event, data, last event id) as a browser's EventSource dispatches them.

    Follows the SSE spec (WHATWG HTML): a line ends at CRLF, a bare CR or LF; a blank line
    dispatches the event; data lines are joined with LF; an id with a NUL is ignored.
    """
    events, data, name, last_id = [], [], "", ""
    for line in re.split(r"\r\n|\r|\n", body):
        if line == "":
            if data:
                events.append((name or "message", "\n".join(data), last_id))
            data, name = [], ""
            continue
        if line.startswith(":"):
            continue
        field, _colon, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id" and "\x00" not in value:
            last_id = value
    return events


FORGERY = "a\rdata: x\r\revent: done\rdata: {}\r\rid: 9:9\r\r\nevent: done\r\ndata: {\"status\": \"failed\"}\r\n\r\nb"


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
