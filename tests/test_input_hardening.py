"""Hostile input is refused quickly with a 4xx, never a 500 or a frozen worker.

Text validators that could backtrack, cursors and stream positions beyond what the database
can bind, numbers written in other scripts' digits, and ``next`` targets that cannot be put in
a header.
"""

from __future__ import annotations

import contextlib
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
    import re

    def accepts(check) -> bool:
        try:
            check(text)
        except Exception:  # noqa: BLE001 - marshmallow's ValidationError
            return False
        return True

    assert accepts(visible_text) == bool(re.search(VISIBLE_TEXT_PATTERN, text))
    assert accepts(no_nul) == bool(re.search(NO_NUL_PATTERN, text))
