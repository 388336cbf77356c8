"""A stream served by the worker that runs its reply waits for the writer instead of polling."""

import threading

import pytest
import sqlalchemy as sa

from chatapp.chat import services, stream
from chatapp.chat.live_replies import get_live_replies
from chatapp.chat.models import Message, Status
from chatapp.chat.stream import reply_events
from chatapp.db import unit_of_work
from tests.api.test_pipeline import post, reply_row
from tests.helpers import checked_out, live_sessions, run_reply_again, wait_for_background_work
from tests.support.sse import parse_events

LIVE_CONFIG = {"BOT_ECHO_DELAY": 0.6, "REPLY_FLUSH_INTERVAL": 0.02, "STREAM_POLL_INTERVAL": 0.01}
CONTENT = "one two three four five six seven eight"


def read_stream(client, url, headers):
    """The stream's message deltas and its done event, read through the view."""
    response = client.get(url, headers=headers, buffered=False)
    events = []
    for chunk in response.response:
        events += parse_events(chunk.decode() if isinstance(chunk, bytes) else chunk)
    response.close()
    return [data for name, data in events if name == "message"], [data for name, data in events if name == "done"]


@pytest.mark.parametrize("extra_config", [LIVE_CONFIG], indirect=True)
def test_a_stream_where_its_reply_runs_reads_the_database_at_the_start_only(
    client, app, alice, conversation_url, progress_reads
):
    reply_id = post(client, alice, conversation_url, CONTENT)
    deltas, done = read_stream(client, f"{conversation_url}/messages/{reply_id}/stream", alice)
    wait_for_background_work(app)
    assert "".join(deltas) == CONTENT == reply_row(app, reply_id)[1]
    assert len(deltas) >= 3, deltas  # live, in several steps
    assert done == ['{"status": "complete", "error": null}']
    # Once, by the view (the generator waits for the job to claim the reply); polling every
    # 10 ms over 0.6 s would have read about 60 times.
    assert len(progress_reads) == 1
    assert len(get_live_replies(app)) == 0  # finished replies are forgotten


@pytest.mark.parametrize("extra_config", [LIVE_CONFIG], indirect=True)
def test_a_stream_whose_reply_runs_elsewhere_polls(client, app, alice, conversation_url, progress_reads, elsewhere):
    # As with a job queue, or a reply running in another gunicorn worker: no live state here.
    reply_id = post(client, alice, conversation_url, CONTENT)
    deltas, done = read_stream(client, f"{conversation_url}/messages/{reply_id}/stream", alice)
    elsewhere[0].join(10)
    assert "".join(deltas) == CONTENT and len(deltas) >= 3
    assert done == ['{"status": "complete", "error": null}']
    assert len(progress_reads) > 10


def fail_reply_elsewhere(app, client, alice, conversation_url, reply_id):
    # What the reaper of another worker does to a reply it thinks is orphaned.
    with unit_of_work(app):
        from chatapp.db import db

        db.session.execute(
            sa.update(Message).where(Message.id == reply_id).values(status=Status.FAILED, error="reaped")
        )
    return '{"status": "failed", "error": "reaped"}'


def delete_conversation(app, client, alice, conversation_url, reply_id):
    assert client.delete(conversation_url, headers=alice).status_code == 204
    return '{"status": "deleted", "error": "the reply was deleted"}'


@pytest.mark.parametrize("change", [fail_reply_elsewhere, delete_conversation])
def test_a_change_made_elsewhere_reaches_a_live_stream_while_the_bot_is_silent(
    client, app, alice, conversation_url, gated_bot, monkeypatch, change
):
    monkeypatch.setattr(stream, "LIVE_RECHECK_SECONDS", 0.2)
    reply_id = post(client, alice, conversation_url)
    assert gated_bot.thinking.wait(10)
    events = reply_events(app, reply_id)
    assert next(events).startswith("retry:")
    assert "partial" in next(events)
    expected = change(app, client, alice, conversation_url, reply_id)
    finished = []
    reader = threading.Thread(target=lambda: finished.extend(events))
    reader.start()
    # The bot stays blocked until after this check: only the recheck can end the stream. A
    # bound for a loaded machine, not a speed target (the recheck runs every 0.2 s here).
    reader.join(30)
    assert not reader.is_alive()
    assert [data for name, data in parse_events("".join(finished)) if name == "done"] == [expected]
    assert checked_out(app) == 0 and live_sessions() == 0
    gated_bot.go_on.set()
    wait_for_background_work(app)
    assert len(get_live_replies(app)) == 0


def test_a_live_stream_resumed_on_an_older_attempt_resets(client, app, alice, conversation_url, gated_bot):
    reply_id = post(client, alice, conversation_url)
    gated_bot.go_on.set()
    wait_for_background_work(app)
    gated_bot.thinking.clear()
    gated_bot.go_on.clear()
    run_reply_again(app, reply_id)
    assert gated_bot.thinking.wait(10)
    # A client that had read all of attempt 0 reconnects while attempt 1 runs here.
    events = reply_events(app, reply_id, resume=(0, len("partial answer")))
    assert next(events).startswith("retry:")
    assert next(events) == "event: reset\ndata: \n\n"
    assert next(events).startswith("id: 1:8\ndata: partial ")
    gated_bot.go_on.set()
    rest = "".join(events)
    assert "data: answer" in rest and rest.endswith('event: done\ndata: {"status": "complete", "error": null}\n\n')
    wait_for_background_work(app)


def reads_failing(monkeypatch, failures: list[BaseException]):
    """The stream's reads of a reply's progress fail with ``failures``, in turn, after its first."""
    read = services.read_reply_progress
    calls = []

    def flaky(reply_id, *args):
        calls.append(reply_id)
        if len(calls) > 1 and failures:
            raise failures.pop(0)
        return read(reply_id, *args)

    monkeypatch.setattr(stream.services, "read_reply_progress", flaky)
    return calls


def pool_busy() -> sa.exc.TimeoutError:
    return sa.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out")


@pytest.mark.parametrize("extra_config", [LIVE_CONFIG], indirect=True)
def test_a_stream_rides_out_reads_that_fail_for_a_moment(
    client, app, alice, conversation_url, monkeypatch, caplog, elsewhere
):
    # A pool busy past pool_timeout (a starved worker under load) fails a few periodic reads:
    # the stream tries again and the client still gets the whole reply, once.
    monkeypatch.setattr(stream, "READ_RETRY_SECONDS", 0.05)
    failures = [pool_busy(), pool_busy(), pool_busy()]
    reads_failing(monkeypatch, failures)
    reply_id = post(client, alice, conversation_url, CONTENT)
    deltas, done = read_stream(client, f"{conversation_url}/messages/{reply_id}/stream", alice)
    elsewhere[0].join(10)
    assert failures == []
    assert "".join(deltas) == CONTENT
    assert done == ['{"status": "complete", "error": null}']
    assert "could not read the database" in caplog.text
    wait_for_background_work(app)  # the conversation's title job, started by its first reply
    assert checked_out(app) == 0


@pytest.mark.parametrize("extra_config", [LIVE_CONFIG], indirect=True)
@pytest.mark.parametrize("lasting", [True, False], ids=["transient-for-too-long", "not-transient"])
def test_a_stream_ends_when_its_reads_keep_failing_or_fail_for_good(
    client, app, alice, conversation_url, gated_bot, monkeypatch, lasting
):
    monkeypatch.setattr(stream, "READ_RETRY_SECONDS", 0.01)
    monkeypatch.setattr(stream, "READ_GRACE_SECONDS", 0.2)
    monkeypatch.setattr(stream, "LIVE_RECHECK_SECONDS", 0.01)
    failures = [pool_busy() for _ in range(10_000)] if lasting else [sa.exc.ProgrammingError("SELECT", {}, None)]
    reads_failing(monkeypatch, failures)
    reply_id = post(client, alice, conversation_url, CONTENT)
    assert gated_bot.thinking.wait(10)
    response = client.get(f"{conversation_url}/messages/{reply_id}/stream", headers=alice, buffered=False)
    with pytest.raises(sa.exc.SQLAlchemyError):
        for _ in response.response:
            pass
    response.close()
    gated_bot.go_on.set()
    wait_for_background_work(app)
    assert checked_out(app) == 0 and live_sessions() == 0
