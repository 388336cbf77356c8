"""The reply pipeline holds no connection while the bot thinks, and never leaves a reply stuck."""

import pytest

from chatapp.chat.bots import BotError
from chatapp.chat.models import Message, Status
from chatapp.chat.stream import reply_events
from chatapp.db import unit_of_work
from tests.fake_openai import FakeOpenAIServer
from tests.helpers import checked_out, live_sessions, run_reply_again, wait_for_background_work


def post(client, headers, url, content="hello"):
    response = client.post(url + "/messages", headers=headers, json={"content": content})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["reply"]["id"]


def reply_row(app, reply_id):
    with unit_of_work(app, write=False) as session:
        reply = session.get(Message, reply_id)
        return reply.status, reply.content, reply.error


def test_no_connection_is_held_while_the_bot_thinks(client, app, alice, conversation_url, gated_bot):
    reply_id = post(client, alice, conversation_url)
    assert gated_bot.thinking.wait(10)
    # The runner thread is inside the bot call: it must hold no session and no connection.
    assert checked_out(app) == 0
    assert live_sessions() == 0
    gated_bot.go_on.set()
    wait_for_background_work(app)
    assert reply_row(app, reply_id) == (Status.COMPLETE, "partial answer", None)


@pytest.mark.parametrize(
    "error, expected",
    [
        (BotError("the model server sent nothing for 60 s"), "the model server sent nothing for 60 s"),
        (RuntimeError("kaboom"), "internal error"),
    ],
)
def test_a_failing_bot_ends_the_reply_failed_keeping_its_text(
    client, app, alice, conversation_url, gated_bot, error, expected
):
    gated_bot.fail_with = error
    reply_id = post(client, alice, conversation_url)
    gated_bot.go_on.set()
    wait_for_background_work(app)
    status, content, message = reply_row(app, reply_id)
    assert status is Status.FAILED and expected in message
    assert content == "partial "
    assert "kaboom" not in message  # internal details stay in the log


@pytest.mark.parametrize(
    "mode, error",
    [("ok", None), ("die", "closed the stream"), ("hang", "sent nothing for 0.5 s"), ("http500", "HTTP 500")],
)
def test_openai_engine_end_to_end(app, client, alice, conversation_url, mode, error):
    with FakeOpenAIServer(mode) as server:
        app.config.update(BOT_ENGINE="openai", OPENAI_BASE_URL=server.base_url, OPENAI_READ_TIMEOUT=0.5)
        reply_id = post(client, alice, conversation_url, "hi model")
        wait_for_background_work(app)
    status, content, message = reply_row(app, reply_id)
    if error is None:
        assert (status, content, message) == (Status.COMPLETE, "Hello from the model.", None)
        assert server.requests[0]["body"]["messages"] == [{"role": "user", "content": "hi model"}]
    else:
        assert status is Status.FAILED and error in message


def test_stream_holds_nothing_between_polls_and_on_close(client, app, alice, conversation_url, gated_bot):
    reply_id = post(client, alice, conversation_url)
    assert gated_bot.thinking.wait(10)
    app.config["STREAM_POLL_INTERVAL"] = 0.01
    events = reply_events(app, reply_id)
    assert next(events).startswith("retry:")
    assert "partial" in next(events)
    # Suspended at a yield, as when a slow client stops reading.
    assert checked_out(app) == 0 and live_sessions() == 0
    events.close()  # the client went away
    assert checked_out(app) == 0 and live_sessions() == 0
    gated_bot.go_on.set()
    wait_for_background_work(app)


def test_stream_through_the_view_closed_mid_way_releases_everything(client, app, alice, conversation_url, gated_bot):
    reply_id = post(client, alice, conversation_url)
    assert gated_bot.thinking.wait(10)
    response = client.get(f"{conversation_url}/messages/{reply_id}/stream", headers=alice, buffered=False)
    chunks = iter(response.response)
    next(chunks)
    next(chunks)
    response.close()
    assert checked_out(app) == 0 and live_sessions() == 0
    gated_bot.go_on.set()
    wait_for_background_work(app)


def test_stream_resumed_on_an_older_attempt_resets(client, app, alice, conversation_url):
    reply_id = post(client, alice, conversation_url, "first answer")
    wait_for_background_work(app)
    run_reply_again(app, reply_id)
    wait_for_background_work(app)
    # A client that had read all of attempt 0 reconnects after the reply was run again.
    events = list(reply_events(app, reply_id, resume=(0, len("first answer"))))
    assert events[1] == "event: reset\ndata: \n\n"
    assert "data: first answer" in events[2] and events[2].startswith("id: 1:12")
    assert events[-1].startswith("event: done")
