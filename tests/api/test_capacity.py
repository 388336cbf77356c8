"""No one user takes a worker's capacity: open streams per user are capped, and the replies
waiting for a reply thread are bounded (503, nothing stored, once full)."""

import gc

import pytest
import sqlalchemy as sa

from chatapp.auth.models import User
from chatapp.chat.models import Message, Status
from chatapp.chat.runner import get_runner
from chatapp.chat.stream_slots import get_stream_slots
from chatapp.db import unit_of_work
from tests.api.test_pipeline import post
from tests.helpers import wait_for_background_work
from tests.support.sse import parse_events
from tests.test_security import log_in

# --- open streams per user ---------------------------------------------------------------------

STREAM_CAP = {"STREAMS_PER_USER": 3, "BOT_ECHO_DELAY": 1.0, "REPLY_FLUSH_INTERVAL": 0.02}


def user_id(app, username: str) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(User.id).where(User.username == username))


def open_stream(client, url, headers):
    """A stream the view has answered, its body not read yet (a client still connected)."""
    return client.get(url, headers=headers, buffered=False)


@pytest.mark.parametrize("extra_config", [STREAM_CAP], indirect=True)
def test_a_user_may_hold_only_so_many_open_streams(client, app, auth, alice, conversation_url):
    reply_id = post(client, alice, conversation_url, "one two three four five six")
    url = f"{conversation_url}/messages/{reply_id}/stream"
    slots, alice_id = get_stream_slots(app), user_id(app, "alice")
    streams = [open_stream(client, url, alice) for _ in range(3)]
    assert [s.status_code for s in streams] == [200, 200, 200]
    assert slots.open_streams(alice_id) == 3

    refused = client.get(url, headers=alice)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "too_many_streams"
    assert "3 reply streams open" in refused.get_json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    # Another user has their own allowance.
    bob = auth.headers("bob")
    bob_conversation = client.post("/api/v1/conversations", headers=bob, json={}).get_json()["id"]
    bob_reply = post(client, bob, f"/api/v1/conversations/{bob_conversation}", "hi")
    bob_stream = open_stream(client, f"/api/v1/conversations/{bob_conversation}/messages/{bob_reply}/stream", bob)
    assert bob_stream.status_code == 200

    # A stream closed before its first event (the client went away at once) gives its slot back...
    streams.pop().close()
    assert slots.open_streams(alice_id) == 2
    streams.append(open_stream(client, url, alice))
    assert streams[-1].status_code == 200
    # ...and so does one read to its end.
    finished = streams.pop(0)
    events = parse_events("".join(chunk.decode() for chunk in finished.response))
    assert events[-1] == ("done", '{"status": "complete", "error": null}')
    finished.close()
    assert slots.open_streams(alice_id) == 2
    for stream in streams + [bob_stream]:
        stream.close()
    assert slots.open_streams(alice_id) == 0 == slots.open_streams(user_id(app, "bob"))


def assert_full_after_three(client, url, headers):
    """All three of the user's slots are free: three streams open, and only three."""
    streams = [open_stream(client, url, headers) for _ in range(3)]
    assert [s.status_code for s in streams] == [200, 200, 200]
    assert client.get(url, headers=headers).status_code == 429
    for stream in streams:
        stream.close()


@pytest.mark.parametrize("extra_config", [STREAM_CAP], indirect=True)
def test_a_stream_refused_or_failing_in_its_view_holds_no_slot(client, app, alice, conversation_url):
    reply_id = post(client, alice, conversation_url, "hello")
    for _ in range(5):  # more than the cap: each 404 gave its slot back
        missing = client.get(f"{conversation_url}/messages/{reply_id + 100}/stream", headers=alice)
        assert missing.status_code == 404
    assert_full_after_three(client, f"{conversation_url}/messages/{reply_id}/stream", alice)
    assert get_stream_slots(app).open_streams(user_id(app, "alice")) == 0


@pytest.mark.parametrize("extra_config", [STREAM_CAP], indirect=True)
def test_a_stream_whose_generator_fails_gives_its_slot_back(client, app, alice, conversation_url, monkeypatch):
    reply_id = post(client, alice, conversation_url, "hello")

    def broken_events(*args):
        yield "retry: 1000\n\n"
        raise RuntimeError("the stream broke")

    with monkeypatch.context() as patched:
        patched.setattr("chatapp.api.messages.reply_events", broken_events)
        stream = open_stream(client, f"{conversation_url}/messages/{reply_id}/stream", alice)
        chunks = iter(stream.response)
        assert next(chunks)
        with pytest.raises(RuntimeError):
            next(chunks)
        stream.close()  # what the WSGI server does after an error, too
    assert get_stream_slots(app).open_streams(user_id(app, "alice")) == 0
    assert_full_after_three(client, f"{conversation_url}/messages/{reply_id}/stream", alice)


@pytest.mark.parametrize("extra_config", [STREAM_CAP], indirect=True)
def test_a_stream_response_that_is_never_served_gives_its_slot_back(client, app, alice, conversation_url, monkeypatch):
    reply_id = post(client, alice, conversation_url, "hello")
    url = f"{conversation_url}/messages/{reply_id}/stream"
    app.config["PROPAGATE_EXCEPTIONS"] = False
    # The log record's traceback would keep the failed response alive in pytest's log capture.
    monkeypatch.setattr(app, "log_exception", lambda exc_info: None)

    def failing_hook(response):
        if response.mimetype == "text/event-stream":
            raise RuntimeError("an after_request hook failed")
        return response

    app.after_request_funcs.setdefault(None, []).append(failing_hook)
    for _ in range(3):
        assert client.get(url, headers=alice).status_code == 500
    app.after_request_funcs[None].remove(failing_hook)
    gc.collect()  # an exception's traceback can keep a dropped response alive until then
    assert get_stream_slots(app).open_streams(user_id(app, "alice")) == 0
    assert_full_after_three(client, url, alice)


# --- replies waiting for a reply thread --------------------------------------------------------

ONE_RUNNING_ONE_WAITING = {"REPLY_WORKERS": 1, "REPLY_QUEUE_MAX": 1}


def message_count(app) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Message))


def new_conversation(client, headers) -> str:
    return f"/api/v1/conversations/{client.post('/api/v1/conversations', headers=headers, json={}).get_json()['id']}"


def assert_busy(response):
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "replies_busy"
    assert int(response.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("extra_config", [ONE_RUNNING_ONE_WAITING], indirect=True)
def test_a_full_reply_queue_answers_503_and_stores_nothing(client, app, alice, gated_bot):
    running = post(client, alice, new_conversation(client, alice))
    assert gated_bot.thinking.wait(10)  # on the only reply thread, blocked
    post(client, alice, new_conversation(client, alice))  # waits for that thread
    third = new_conversation(client, alice)
    before = message_count(app)
    assert_busy(client.post(third + "/messages", headers=alice, json={"content": "one too many"}))
    assert message_count(app) == before
    assert client.get(third + "/messages", headers=alice).get_json()["items"] == []

    gated_bot.go_on.set()
    wait_for_background_work(app)
    # Both replies finished, and the refused post can be sent again.
    assert post(client, alice, third)
    wait_for_background_work(app)
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(Message.content).where(Message.id == running)) == "partial answer"


@pytest.mark.parametrize("extra_config", [ONE_RUNNING_ONE_WAITING], indirect=True)
def test_a_full_reply_queue_refuses_regenerating_and_the_browser_form_too(client, app, alice, conversation_url):
    reply_id = post(client, alice, conversation_url)
    wait_for_background_work(app)
    runner = get_runner(app)
    # Two views that have reserved places and not yet committed fill the runner.
    held = [runner.reserve(), runner.reserve()]
    regenerate = f"{conversation_url}/messages/{reply_id}/regenerate"
    assert_busy(client.post(regenerate, headers=alice))
    with unit_of_work(app, write=False) as session:
        row = session.execute(sa.select(Message.status, Message.attempt).where(Message.id == reply_id)).one()
    assert tuple(row) == (Status.COMPLETE, 0)  # not restarted
    browser, _csrf = log_in(app, "alice")
    conversation_id = int(conversation_url.rsplit("/", 1)[1])
    before = message_count(app)
    page = browser.post(f"/c/{conversation_id}/messages", data={"content": "from the form"})
    assert page.status_code == 503 and page.mimetype == "text/html"
    assert "too many replies are waiting" in page.get_data(as_text=True).lower()
    assert message_count(app) == before

    held.pop().release()
    assert client.post(regenerate, headers=alice).status_code == 202
    held.pop().release()
    wait_for_background_work(app)


@pytest.mark.parametrize("extra_config", [ONE_RUNNING_ONE_WAITING], indirect=True)
def test_a_place_reserved_for_a_commit_that_fails_is_given_back(app):
    runner = get_runner(app)
    with pytest.raises(RuntimeError):
        with runner.reserve():
            raise RuntimeError("the commit failed")
    # Both places are free again: nothing was lost to the failed commit.
    held = [runner.reserve(), runner.reserve()]
    with pytest.raises(Exception, match="too many replies"):
        runner.reserve()
    for reservation in held:
        reservation.release()
        reservation.release()  # twice is harmless
    runner.reserve().release()
