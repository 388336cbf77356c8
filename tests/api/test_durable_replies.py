"""Replies outlive the process that started them: leases, take-over, stop, hand-over,
one reply at a time per conversation, and idempotent posts."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from chatapp import create_app
from chatapp.chat import leases
from chatapp.chat import services as chat_services
from chatapp.chat.models import Message, Role, Status
from chatapp.chat.runner import get_runner
from chatapp.chat.sweeper import sweep_once
from chatapp.db import begin_write, db, unit_of_work, utcnow
from tests.conftest import base_test_config
from tests.fake_openai import FakeOpenAIServer
from tests.helpers import wait_for_background_work
from tests.support.sse import parse_events
from tests.test_faults import pending_reply

SLOW = {"BOT_ECHO_DELAY": 30, "REPLY_FLUSH_INTERVAL": 0.05, "REPLY_STOP_CHECK_SECONDS": 0.1}
WORDS = " ".join(f"word{n}" for n in range(60))


def post(client, headers, url, content=WORDS, key=None):
    extra = {"Idempotency-Key": key} if key else {}
    return client.post(url + "/messages", headers={**headers, **extra}, json={"content": content})


def reply_of(app, reply_id) -> Message:
    with unit_of_work(app, write=False) as session:
        return session.get(Message, reply_id)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def stored_text(app, reply_id) -> str:
    return reply_of(app, reply_id).content


# --- stop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra_config", [SLOW], indirect=True)
def test_stop_ends_a_running_reply_keeping_its_text(client, app, alice, conversation_url):
    reply_id = post(client, alice, conversation_url).get_json()["reply"]["id"]
    assert wait_for(lambda: len(stored_text(app, reply_id)) > 0)
    response = client.post(f"{conversation_url}/messages/{reply_id}/stop", headers=alice)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "stopped" and body["id"] == reply_id
    assert body["content"] and WORDS.startswith(body["content"]) and body["content"] != WORDS
    # The run ends at once (the echo bot would talk for 30 s) and writes nothing more.
    assert get_runner(app).wait_idle(5)
    reply = reply_of(app, reply_id)
    assert (reply.status, reply.content, reply.error) == (Status.STOPPED, body["content"], None)
    # The stream ends with the stopped status.
    stream = client.get(f"{conversation_url}/messages/{reply_id}/stream", headers=alice)
    events = parse_events(stream.get_data(as_text=True))
    assert events[-1] == ("done", '{"status": "stopped", "error": null}')
    assert "".join(data for name, data in events if name == "message") == body["content"]
    # Stopping it again says why not; the conversation takes messages; it can be regenerated.
    again = client.post(f"{conversation_url}/messages/{reply_id}/stop", headers=alice)
    assert again.status_code == 409
    assert again.get_json()["error"]["code"] == "reply_not_running"
    assert "already ended (stopped)" in again.get_json()["error"]["message"]
    app.config["BOT_ECHO_DELAY"] = 0
    regenerated = client.post(f"{conversation_url}/messages/{reply_id}/regenerate", headers=alice)
    assert regenerated.status_code == 202, regenerated.get_json()
    wait_for_background_work(app)
    # A new version; the stopped one keeps its text.
    assert reply_of(app, regenerated.get_json()["id"]).status is Status.COMPLETE
    assert reply_of(app, reply_id).status is Status.STOPPED


def test_stop_is_refused_for_finished_and_for_others_replies(client, app, auth, alice, conversation_url):
    reply_id = post(client, alice, conversation_url, "short").get_json()["reply"]["id"]
    wait_for_background_work(app)
    finished = client.post(f"{conversation_url}/messages/{reply_id}/stop", headers=alice)
    assert finished.status_code == 409
    assert finished.get_json()["error"]["message"].startswith("this reply has already ended (complete)")
    assert reply_of(app, reply_id).status is Status.COMPLETE
    mallory = auth.headers("mallory")
    assert client.post(f"{conversation_url}/messages/{reply_id}/stop", headers=mallory).status_code == 404
    # A user message is not a reply.
    assert client.post(f"{conversation_url}/messages/{reply_id - 1}/stop", headers=alice).status_code == 404


@pytest.fixture
def second_worker(database_uri, extra_config, tmp_path):
    """Another app on the same database: a second worker, with its own runner and streams."""
    other = create_app({**base_test_config(database_uri), **extra_config})
    other.instance_path = str(tmp_path / "second")
    yield other
    get_runner(other).wait_idle(10)
    with other.app_context():
        for engine in db.engines.values():
            engine.dispose()


@pytest.mark.parametrize("extra_config", [{"REPLY_STOP_CHECK_SECONDS": 0.1}], indirect=True)
def test_stop_from_another_worker_closes_the_model_request(client, app, alice, conversation_url, second_worker):
    with FakeOpenAIServer("silent", reply_words=["Hello", " never sent"]) as model:
        for instance in (app, second_worker):
            instance.config.update(
                BOT_ENGINE="openai", OPENAI_BASE_URL=model.base_url, OPENAI_READ_TIMEOUT=60, REPLY_FLUSH_INTERVAL=0
            )
        reply_id = post(client, alice, conversation_url, "hi").get_json()["reply"]["id"]
        # The model sent its first words and is now silent, its request open.
        assert wait_for(lambda: stored_text(app, reply_id) == "Hello")
        response = second_worker.test_client().post(f"{conversation_url}/messages/{reply_id}/stop", headers=alice)
        assert response.status_code == 200, response.get_json()
        # The first worker notices within its stop check, and hangs up on the model
        # instead of waiting the 60 s read timeout.
        assert model.client_gone.wait(15), "the model's request was left open"
        assert get_runner(app).wait_idle(15)
    reply = reply_of(app, reply_id)
    assert (reply.status, reply.content) == (Status.STOPPED, "Hello")


# --- one reply at a time, enforced by the database ------------------------------------------


@pytest.mark.parametrize("extra_config", [{"BOT_ECHO_DELAY": 60}], indirect=True)
def test_of_concurrent_posts_to_one_conversation_exactly_one_is_accepted(app, client, alice, conversation_url):
    clients = 8
    barrier = threading.Barrier(clients)
    answers = []

    def send(n):
        client = app.test_client()
        barrier.wait()
        answers.append(post(client, alice, conversation_url, f"message {n}"))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [202] + [409] * (clients - 1), [a.get_json() for a in answers]
    assert {a.get_json()["error"]["code"] for a in answers if a.status_code == 409} == {"reply_in_progress"}
    with unit_of_work(app, write=False) as session:
        roles = session.scalars(sa.select(Message.role)).all()
    assert sorted(roles) == [Role.ASSISTANT, Role.USER]
    (accepted,) = [answer.get_json() for answer in answers if answer.status_code == 202]
    stop = client.post(f"{conversation_url}/messages/{accepted['reply']['id']}/stop", headers=alice)
    assert stop.status_code == 200
    wait_for_background_work(app)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_post_that_passed_the_read_check_is_refused_by_the_database(app, alice, client, conversation_url):
    # PostgreSQL's READ COMMITTED: the second post cannot see the first one's uncommitted
    # reply, passes the "reply in progress" read, and is stopped by the unique index.
    conversation_id = int(conversation_url.rsplit("/", 1)[1])
    first_inserted, second_result = threading.Event(), []
    with app.app_context():
        begin_write()
        chat_services.post_message_to(conversation_id, "first")
        first_inserted.set()

        def second():
            with app.app_context():
                try:
                    assert chat_services._reply_in_progress(conversation_id) is False
                    chat_services.post_message_to(conversation_id, "second")
                    second_result.append("accepted")
                except Exception as error:  # noqa: BLE001 - the test reports what happened
                    second_result.append(error)
                finally:
                    db.session.rollback()
                    db.session.remove()

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)  # the second INSERT now waits on the first transaction's index entry
        db.session.commit()
        db.session.remove()
    thread.join(10)
    assert len(second_result) == 1
    error = second_result[0]
    assert getattr(error, "code", None) == "reply_in_progress", error


# --- idempotent posts -------------------------------------------------------------------------


def test_a_retried_post_with_the_same_key_returns_the_same_message_and_reply(client, app, alice, conversation_url):
    first = post(client, alice, conversation_url, "hello there", key="key-1")
    assert first.status_code == 202
    # Retried while its reply may still be running, then after it finished: never a 409.
    retry = post(client, alice, conversation_url, "hello there", key="key-1")
    assert retry.status_code == 202, retry.get_json()
    wait_for_background_work(app)
    late_retry = post(client, alice, conversation_url, "hello there", key="key-1")
    assert late_retry.status_code == 202
    ids = lambda answer: (answer.get_json()["message"]["id"], answer.get_json()["reply"]["id"])  # noqa: E731
    assert ids(first) == ids(retry) == ids(late_retry)
    assert late_retry.get_json()["reply"]["status"] == "complete"
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 2
    # The same key in another conversation is another message; a new key is a new message.
    other = client.post("/api/v1/conversations", headers=alice, json={}).get_json()
    assert post(client, alice, f"/api/v1/conversations/{other['id']}", "hello there", key="key-1").status_code == 202
    assert post(client, alice, conversation_url, "hello again", key="key-2").status_code == 202
    wait_for_background_work(app)


def test_an_idempotency_key_reused_for_other_content_or_malformed_is_refused(client, app, alice, conversation_url):
    assert post(client, alice, conversation_url, "one", key="k").status_code == 202
    wait_for_background_work(app)
    reused = post(client, alice, conversation_url, "two", key="k")
    assert reused.status_code == 422
    assert "Idempotency-Key" in reused.get_json()["error"]["message"]
    for bad in ("x" * 101, "tab\there", "ünï"):
        answer = client.post(
            conversation_url + "/messages",
            json={"content": "three"},
            headers={**alice, "Idempotency-Key": bad.encode("utf-8").decode("latin-1")},
        )
        assert answer.status_code == 422, (bad, answer.get_json())
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 2


@pytest.mark.parametrize("extra_config", [{"BOT_ECHO_DELAY": 1}], indirect=True)
def test_concurrent_posts_with_one_key_make_one_message(app, alice, conversation_url):
    clients = 6
    barrier = threading.Barrier(clients)
    answers = []

    def send():
        client = app.test_client()
        barrier.wait()
        answers.append(post(client, alice, conversation_url, "same", key="retry-me"))

    threads = [threading.Thread(target=send) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [a.status_code for a in answers] == [202] * clients, [a.get_json() for a in answers]
    assert len({(a.get_json()["message"]["id"], a.get_json()["reply"]["id"]) for a in answers}) == 1
    wait_for_background_work(app)
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 2


def test_the_openapi_document_describes_stop_and_the_idempotency_key(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    stop = spec["paths"]["/api/v1/conversations/{conversation_id}/messages/{reply_id}/stop"]["post"]
    assert {"200", "404", "409"} <= set(stop["responses"])
    parameters = spec["paths"]["/api/v1/conversations/{conversation_id}/messages"]["post"]["parameters"]
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in parameters)
    assert "stopped" in spec["components"]["schemas"]["MessageOut"]["properties"]["status"]["enum"]


# --- leases ------------------------------------------------------------------------------------


def expire_lease(app, reply_id: int) -> None:
    with unit_of_work(app) as session:
        session.execute(
            sa.update(Message).where(Message.id == reply_id).values(lease_expires_at=utcnow() - timedelta(seconds=5))
        )


def test_a_claim_is_exclusive_and_an_expired_lease_is_taken_over_as_a_new_attempt(app):
    reply_id = pending_reply(app, "alpha beta gamma")
    with unit_of_work(app):
        assert leases.claim(reply_id, "host:1:a", 10, 3) == 0
    with unit_of_work(app):
        assert leases.claim(reply_id, "host:2:b", 10, 3) is None  # held
        assert chat_services.append_to_reply(reply_id, 0, "alpha ", owner="host:1:a")
        assert not chat_services.append_to_reply(reply_id, 0, "x", owner="host:2:b")
    # The first process dies: its lease runs out, the second takes the reply over.
    expire_lease(app, reply_id)
    with unit_of_work(app):
        assert leases.claim(reply_id, "host:2:b", 10, 3) == 1
    reply = reply_of(app, reply_id)
    assert (reply.status, reply.content, reply.attempt, reply.runs) == (Status.PENDING, "", 1, 2)
    with unit_of_work(app):
        # The old owner, if it still runs somewhere, can no longer write.
        assert not chat_services.append_to_reply(reply_id, 0, "beta", owner="host:1:a")
        assert not chat_services.append_to_reply(reply_id, 1, "beta", owner="host:1:a")
        assert chat_services.finish_reply(reply_id, 1, "done", owner="host:2:b")
    assert reply_of(app, reply_id).content == "done"


@pytest.mark.parametrize("extra_config", [{"REPLY_MAX_RUNS": 2, "REPLY_LEASE_SECONDS": 10}], indirect=True)
def test_a_reply_interrupted_too_often_fails_saying_why(app):
    reply_id = pending_reply(app, "alpha beta gamma")
    for owner in ("p:1:a", "p:2:b"):
        with unit_of_work(app):
            assert leases.claim(reply_id, owner, 10, 2) is not None
        expire_lease(app, reply_id)
    assert sweep_once(app) == [reply_id]
    wait_for_background_work(app)
    reply = reply_of(app, reply_id)
    assert reply.status is Status.FAILED
    assert reply.error == leases.interrupted_error(2)
    assert "interrupted 2 times" in reply.error and "regenerate" in reply.error


def test_a_handed_over_run_does_not_count_and_restarts_the_text(app):
    reply_id = pending_reply(app, "alpha beta gamma")
    with unit_of_work(app):
        leases.claim(reply_id, "p:1:a", 10, 3)
        chat_services.append_to_reply(reply_id, 0, "alpha ", owner="p:1:a")
    with unit_of_work(app):
        assert leases.release("p:1:a", [reply_id]) == 1
        assert not chat_services.append_to_reply(reply_id, 0, "beta", owner="p:1:a")
    with unit_of_work(app):
        assert leases.claim(reply_id, "p:2:b", 10, 3) == 1
    reply = reply_of(app, reply_id)
    assert (reply.content, reply.attempt, reply.runs) == ("", 1, 1)


@pytest.mark.parametrize(
    "extra_config",
    [{"REPLY_LEASE_SECONDS": 3.0, "REPLY_LEASE_RENEW_SECONDS": 0.2, "REPLY_STOP_CHECK_SECONDS": 0.1}],
    indirect=True,
)
def test_the_lease_is_renewed_while_the_bot_is_silent(client, app, alice, conversation_url, gated_bot):
    reply_id = post(client, alice, conversation_url, "hi").get_json()["reply"]["id"]
    assert gated_bot.thinking.wait(10)
    first_expiry = reply_of(app, reply_id).lease_expires_at
    time.sleep(4)  # longer than the lease: only renewals keep it
    reply = reply_of(app, reply_id)
    assert reply.lease_expires_at > first_expiry and reply.lease_expires_at > utcnow()
    assert sweep_once(app) == []  # nothing orphaned
    gated_bot.go_on.set()
    wait_for_background_work(app)
    reply = reply_of(app, reply_id)
    assert (reply.status, reply.content, reply.attempt, reply.runs) == (Status.COMPLETE, "partial answer", 0, 1)


@pytest.mark.parametrize("extra_config", [{"REPLY_LEASE_SECONDS": 0}], indirect=True)
def test_the_sweep_runs_a_reply_that_no_runner_started(app):
    # Committed, but its process died before handing it to a runner.
    reply_id = pending_reply(app, "lost start")
    assert sweep_once(app) == [reply_id]
    wait_for_background_work(app)
    reply = reply_of(app, reply_id)
    assert (reply.status, reply.content, reply.attempt) == (Status.COMPLETE, "lost start", 0)


@pytest.mark.parametrize("extra_config", [{**SLOW, "REPLY_LEASE_SECONDS": 0}], indirect=True)
def test_shutdown_hands_unfinished_replies_to_another_worker(client, app, alice, conversation_url, second_worker):
    reply_id = post(client, alice, conversation_url).get_json()["reply"]["id"]
    assert wait_for(lambda: len(stored_text(app, reply_id)) > 0)
    get_runner(app).shutdown(grace=0.2)
    reply = reply_of(app, reply_id)
    assert reply.status is Status.STREAMING and reply.lease_owner == leases.RELEASED
    # Shut down: it starts nothing more (another worker's sweep will).
    get_runner(app).submit(reply_id)
    assert get_runner(app).wait_idle(0)
    second_worker.config["BOT_ECHO_DELAY"] = 0
    assert sweep_once(second_worker) == [reply_id]
    assert get_runner(second_worker).wait_idle(10)
    reply = reply_of(app, reply_id)
    assert (reply.status, reply.content, reply.attempt, reply.runs) == (Status.COMPLETE, WORDS, 1, 1)


# --- bot output the database would refuse ------------------------------------------------------


def test_bot_output_the_database_refuses_is_cleaned_not_stuck(client, app, alice, conversation_url):
    words = ["nul\x00here", " lone \ud800 surrogate", " end"]
    with FakeOpenAIServer("ok", reply_words=words) as model:
        app.config.update(BOT_ENGINE="openai", OPENAI_BASE_URL=model.base_url)
        reply_id = post(client, alice, conversation_url, "hi").get_json()["reply"]["id"]
        wait_for_background_work(app)
    reply = reply_of(app, reply_id)
    assert (reply.status, reply.content) == (Status.COMPLETE, "nulhere lone \ufffd surrogate end")


@pytest.mark.parametrize("extra_config", [SLOW], indirect=True)
def test_the_bot_sees_what_a_stopped_reply_had_said(client, app, alice, conversation_url):
    reply_id = post(client, alice, conversation_url).get_json()["reply"]["id"]
    assert wait_for(lambda: len(stored_text(app, reply_id)) > 0)
    kept = client.post(f"{conversation_url}/messages/{reply_id}/stop", headers=alice).get_json()["content"]
    assert get_runner(app).wait_idle(15)
    with FakeOpenAIServer("ok") as model:
        app.config.update(BOT_ENGINE="openai", OPENAI_BASE_URL=model.base_url)
        assert post(client, alice, conversation_url, "go on").status_code == 202
        wait_for_background_work(app)
    assert model.requests[0]["body"]["messages"] == [
        {"role": "user", "content": WORDS},
        {"role": "assistant", "content": kept},
        {"role": "user", "content": "go on"},
    ]
