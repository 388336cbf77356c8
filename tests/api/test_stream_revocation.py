"""A stream outlives the request that authenticated it: revoking its token, or ending the browser
login it was opened with, ends it within seconds, through the real stream endpoint."""

import json
import threading
import time

import pytest

from chatapp.chat.pipeline import generate_reply
from chatapp.chat.runner import get_runner
from chatapp.chat.stream import LIVE_RECHECK_SECONDS
from tests.support.sse import parse_events
from tests.web.conftest import PASSWORD, WebUser, csrf_from

# The echo bot spreads its 60 words over 15 s: the reply is still being written when the
# stream must end, so only the credential check can end it.
# The reply talks for a minute; the stream re-checks its credential every
# LIVE_RECHECK_SECONDS (5 s). A stream that ends "unauthorized" long before the reply would
# have ended was ended by the revocation: no clock needed, so a busy machine cannot fail it.
SLOW_BOT = {"BOT_ECHO_DELAY": 60.0, "REPLY_FLUSH_INTERVAL": 0.05, "STREAM_POLL_INTERVAL": 0.05}
CONTENT = " ".join(f"word{n}" for n in range(60))
ENDS_WITHIN = 30.0


@pytest.fixture(params=["live", "polling"])
def where_the_reply_runs(request, app, monkeypatch):
    """live: the reply runs in this process (the stream waits on it); polling: as if it ran in
    another worker (the stream polls the database)."""
    if request.param == "polling":
        threads = []

        def submit_elsewhere(reply_id, reservation=None):  # the reservation is given back on exit
            threads.append(threading.Thread(target=generate_reply, args=(app, reply_id)))
            threads[-1].start()

        monkeypatch.setattr(get_runner(app), "submit", submit_elsewhere)
        yield request.param
        for thread in threads:
            thread.join(30)
    else:
        yield request.param


def open_stream(client, url, headers):
    """The stream, read until its first words arrive; returns the response and its chunk iterator."""
    response = client.get(url, headers=headers, buffered=False)
    assert response.status_code == 200
    chunks = iter(response.response)
    received = ""
    while not any(name == "message" for name, _data in parse_events(received)):
        received += next(chunks).decode()
    return response, chunks


def finish_within(chunks, seconds: float) -> tuple[list, float]:
    """Read the rest of the stream on a thread; (its events, how long it took) once it ends."""
    rest: list[str] = []
    started = time.monotonic()
    reader = threading.Thread(target=lambda: rest.extend(chunk.decode() for chunk in chunks))
    reader.start()
    reader.join(seconds + 5)
    assert not reader.is_alive(), "the stream went on after its credential was revoked"
    return parse_events("".join(rest)), time.monotonic() - started


def assert_ended_unauthorized(events, took):
    print(f"stream ended {took:.1f} s after the revocation (re-checked every {LIVE_RECHECK_SECONDS:g} s)")
    name, data = events[-1]
    assert name == "done"
    assert json.loads(data)["status"] == "unauthorized"


@pytest.mark.parametrize("extra_config", [SLOW_BOT], indirect=True)
def test_revoking_a_token_ends_the_streams_it_opened(client, app, auth, where_the_reply_runs):
    alice = auth.headers("alice")
    other_token = {"Authorization": f"Bearer {auth.token()}"}
    conversation = client.post("/api/v1/conversations", headers=alice, json={}).get_json()["id"]
    reply = client.post(
        f"/api/v1/conversations/{conversation}/messages", headers=alice, json={"content": CONTENT}
    ).get_json()["reply"]["id"]
    url = f"/api/v1/conversations/{conversation}/messages/{reply}/stream"
    response, chunks = open_stream(client, url, alice)

    assert app.test_client().delete("/api/v1/tokens/current", headers=alice).status_code == 204
    events, took = finish_within(chunks, ENDS_WITHIN)
    response.close()
    assert_ended_unauthorized(events, took)
    # An EventSource reconnecting with the revoked token is refused; another token still reads.
    assert client.get(url, headers=alice).status_code == 401
    assert client.get(f"/api/v1/conversations/{conversation}/messages", headers=other_token).status_code == 200
    # Deleting the conversation stops the slow reply at its next write, so the test ends now;
    # then the leak guard checks that the stream and the reply left nothing behind (not
    # before: the reply's writer and lease keeper hold a connection for moments as they run).
    assert client.delete(f"/api/v1/conversations/{conversation}", headers=other_token).status_code == 204


@pytest.mark.parametrize("extra_config", [SLOW_BOT], indirect=True)
def test_ending_a_browser_login_ends_the_streams_it_opened(client, app, auth, where_the_reply_runs):
    auth.register("alice")
    token = {"Authorization": f"Bearer {auth.token()}"}
    WebUser(client).login("alice")
    csrf = {"X-CSRFToken": csrf_from(client.get("/settings").get_data(as_text=True))}
    conversation = client.post("/api/v1/conversations", headers=csrf, json={}).get_json()["id"]
    reply = client.post(
        f"/api/v1/conversations/{conversation}/messages", headers=csrf, json={"content": CONTENT}
    ).get_json()["reply"]["id"]
    url = f"/api/v1/conversations/{conversation}/messages/{reply}/stream"
    response, chunks = open_stream(client, url, {})

    # From another browser: "Log out everywhere".
    laptop = app.test_client()
    laptop.post("/login", data={"username": "alice", "password": PASSWORD})
    assert laptop.post("/settings/sessions/end-all").status_code == 302
    events, took = finish_within(chunks, ENDS_WITHIN)
    response.close()
    assert_ended_unauthorized(events, took)
    assert client.get(url).status_code == 401
    assert client.delete(f"/api/v1/conversations/{conversation}", headers=token).status_code == 204
