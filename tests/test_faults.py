"""Database outages and worker crashes: what a client sees, and that nothing acknowledged is lost.

In-process tests provoke each recovery path deterministically, by killing the
connection a session holds at a chosen statement: on PostgreSQL its backend is
terminated (pg_terminate_backend), on SQLite the DBAPI connection is closed under
SQLAlchemy, which both report as a disconnect. The gunicorn tests then check the
outcomes under load on a real server: every connection terminated, the database
unreachable behind a TCP proxy (tests/tcp_proxy.py), a worker SIGKILLed, with client
threads (tests/support/load.py) recording every call meanwhile.
"""

from __future__ import annotations

import collections
import os
import signal
import time

import pytest
import requests
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from chatapp.auth import services as auth_services
from chatapp.auth.models import User
from chatapp.chat import services as chat_services
from chatapp.chat.models import Message, Role, Status
from chatapp.chat.pipeline import generate_reply
from chatapp.chat.sweeper import sweep_once
from chatapp.db import unit_of_work
from tests.faults import KillAt, commit_answer_lost, hooked, kill_connection, killed_at_commit
from tests.helpers import checked_out, live_sessions, wait_for_background_work
from tests.support.databases import active_replies, busiest_worker, describe_active_replies
from tests.support.load import Traffic, assert_acked_messages_stored, chats, reads, register_clients, wait_until
from tests.support.servers import GunicornServer
from tests.tcp_proxy import TcpProxy

ACTIVE = ("pending", "streaming")
IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")


def count_rows(app, model) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model))


@pytest.fixture
def conversation(client, auth):
    headers = auth.headers()
    response = client.post("/api/v1/conversations", json={"title": "faults"}, headers=headers)
    assert response.status_code == 201
    conversation_id = response.get_json()["id"]
    # A first read records the token's use, so later requests are reads only.
    assert client.get(f"/api/v1/conversations/{conversation_id}", headers=headers).status_code == 200
    return conversation_id, headers


# --- retry once: reads only -------------------------------------------------------------


def test_read_whose_connection_dies_mid_request_is_retried_once(app, client, conversation):
    conversation_id, headers = conversation
    # The token lookup used the connection; it dies before the view's query.
    with hooked(app, "before_cursor_execute", KillAt("FROM conversations")) as hook:
        response = client.get(f"/api/v1/conversations/{conversation_id}", headers=headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["id"] == conversation_id
    assert hook.kills == 1 and hook.seen == 2  # the first attempt died, the second ran


def test_a_read_is_retried_only_once(app, client, conversation):
    conversation_id, headers = conversation
    with hooked(app, "before_cursor_execute", KillAt("FROM conversations", kill_on=(1, 2))) as hook:
        response = client.get(f"/api/v1/conversations/{conversation_id}", headers=headers)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "database_unavailable"
    assert response.headers["Retry-After"]
    assert hook.seen == 2


def test_a_write_whose_connection_dies_is_not_retried_and_stores_nothing(app, client, conversation):
    conversation_id, headers = conversation
    with hooked(app, "before_cursor_execute", KillAt("INSERT INTO messages")) as hook:
        response = client.post(
            f"/api/v1/conversations/{conversation_id}/messages",
            json={"content": "hello"},
            headers=headers,
        )
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "database_unavailable"
    assert hook.seen == 1  # never run again: a POST's commit may already have happened
    assert count_rows(app, Message) == 0


# --- a view's end that survives a dead connection --------------------------------------


@pytest.fixture
def die_as_view_ends(app):
    """Once armed, the next request's connection dies as its transaction ends (commit or rollback)."""
    switch = {"armed": False, "kills": 0}

    def kill(conn):
        if switch["armed"]:
            switch["armed"] = False
            switch["kills"] += 1
            kill_connection(conn)

    with hooked(app, "commit", kill), hooked(app, "rollback", kill):
        yield switch


def test_request_whose_connection_dies_after_its_view_succeeds(app, die_as_view_ends, client, conversation):
    conversation_id, headers = conversation
    die_as_view_ends["armed"] = True
    with hooked(app, "before_cursor_execute", KillAt("FROM conversations", kill_on=())) as count:
        response = client.get(f"/api/v1/conversations/{conversation_id}", headers=headers)
    # The end of the view's read met a dead connection, and the answer stands.
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["id"] == conversation_id
    assert die_as_view_ends["kills"] == 1
    assert count.seen == 1  # not retried: nothing failed that the client could see
    assert live_sessions() == 0 and checked_out(app) == 0


def test_4xx_whose_connection_died_is_still_the_4xx(app, die_as_view_ends, client, conversation):
    _, headers = conversation
    die_as_view_ends["armed"] = True
    response = client.get("/api/v1/conversations/999999", headers=headers)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "conversation_not_found"
    assert die_as_view_ends["kills"] == 1
    assert live_sessions() == 0 and checked_out(app) == 0


def test_unit_of_work_keeps_the_original_error_when_its_connection_died(app):
    with pytest.raises(ValueError, match="the block's own error"):
        with unit_of_work(app, write=False) as session:
            session.execute(sa.select(1))
            kill_connection(session.connection())
            raise ValueError("the block's own error")
    assert live_sessions() == 0 and checked_out(app) == 0


def test_unit_of_work_whose_commit_cannot_happen_raises_and_stores_nothing(app):
    with pytest.raises(sa.exc.DBAPIError):
        with unit_of_work(app) as session:
            auth_services.create_user("ghost", "correct horse")
            kill_connection(session.connection())
    assert live_sessions() == 0 and checked_out(app) == 0
    assert count_rows(app, User) == 0


# --- a POST or regenerate whose COMMIT fails in flight ----------------------------------


def post_message(client, conversation, content: str = "alpha beta"):
    conversation_id, headers = conversation
    return client.post(f"/api/v1/conversations/{conversation_id}/messages", json={"content": content}, headers=headers)


def test_post_whose_commit_landed_unseen_still_starts_its_reply(app, client, conversation):
    with commit_answer_lost(app, "INSERT INTO messages") as fault:
        response = post_message(client, conversation)
    assert fault.fired == 1
    # The message is stored, so the answer is the 202, and the reply runs now rather
    # than waiting for another process's sweep while the conversation refuses new messages.
    assert response.status_code == 202, response.get_json()
    wait_for_background_work(app)
    reply = reply_row(app, response.get_json()["reply"]["id"])
    assert (reply.status, reply.content) == (Status.COMPLETE, "alpha beta")
    assert post_message(client, conversation, "next").status_code == 202


def test_regenerate_whose_commit_landed_unseen_still_starts_the_new_attempt(app, client, conversation):
    conversation_id, headers = conversation
    reply_id = post_message(client, conversation).get_json()["reply"]["id"]
    wait_for_background_work(app)
    with commit_answer_lost(app, "UPDATE conversations") as fault:
        response = client.post(
            f"/api/v1/conversations/{conversation_id}/messages/{reply_id}/regenerate", headers=headers
        )
    assert fault.fired == 1
    assert response.status_code == 202, response.get_json()
    version_id = response.get_json()["id"]
    assert version_id != reply_id and response.get_json()["status"] == "pending"
    wait_for_background_work(app)
    version = reply_row(app, version_id)
    assert (version.status, version.content, version.attempt) == (Status.COMPLETE, "alpha beta", 0)


def test_post_whose_commit_fails_in_flight_stores_nothing(app, client, conversation):
    # The connection dies after the INSERTs, as the COMMIT is sent: nothing landed.
    with killed_at_commit(app, "INSERT INTO messages") as fault:
        response = post_message(client, conversation)
    assert fault.fired == 1
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "database_unavailable"
    assert count_rows(app, Message) == 0
    assert live_sessions() == 0 and checked_out(app) == 0
    assert post_message(client, conversation).status_code == 202


# --- the reply pipeline rides out a lost connection -------------------------------------

FLUSH_EVERY_CHUNK = {"REPLY_FLUSH_INTERVAL": 0, "REPLY_WRITE_RETRY_SECONDS": 10}
WORDS = "alpha beta gamma delta"


def pending_reply(app, content: str = WORDS) -> int:
    with unit_of_work(app):
        user = auth_services.create_user("bob", "correct horse")
        conversation = chat_services.create_conversation(user.id)
        _, reply = chat_services.post_message(conversation, content)
    return reply.id


def reply_row(app, reply_id: int) -> Message:
    with unit_of_work(app, write=False) as session:
        return session.get(Message, reply_id)


@pytest.mark.parametrize("extra_config", [FLUSH_EVERY_CHUNK])
def test_reply_write_lost_before_its_commit_is_written_again(app):
    reply_id = pending_reply(app)
    # Writes: one append per word, then the finish; the second append dies mid-transaction.
    with hooked(app, "before_cursor_execute", KillAt("UPDATE messages", kill_on=(2,))) as hook:
        assert generate_reply(app, reply_id) == "complete"
    assert hook.kills == 1
    reply = reply_row(app, reply_id)
    assert (reply.status, reply.content, reply.error) == (Status.COMPLETE, WORDS, None)


@pytest.mark.parametrize("extra_config", [FLUSH_EVERY_CHUNK])
def test_reply_write_whose_commit_landed_unseen_is_not_applied_twice(app):
    reply_id = pending_reply(app)
    state = {"updates": 0, "armed": False, "raised": 0}

    def count_updates(conn, cursor, statement, parameters, context, executemany):
        if "UPDATE messages" in statement:
            state["updates"] += 1
            state["armed"] = state["updates"] == 2

    def lose_the_acknowledgement(session):
        # The COMMIT reached the database, but the caller hears of a lost connection.
        if state["armed"]:
            state["armed"] = False
            state["raised"] += 1
            raise sa.exc.OperationalError("COMMIT", None, Exception("server closed the connection"))

    event.listen(Session, "after_commit", lose_the_acknowledgement)
    try:
        with hooked(app, "after_cursor_execute", count_updates):
            assert generate_reply(app, reply_id) == "complete"
    finally:
        event.remove(Session, "after_commit", lose_the_acknowledgement)
    assert state["raised"] == 1
    reply = reply_row(app, reply_id)
    # Writing "beta " again would have stored "alpha beta beta gamma delta".
    assert (reply.status, reply.content) == (Status.COMPLETE, WORDS)


@pytest.mark.parametrize(
    "extra_config",
    [{**FLUSH_EVERY_CHUNK, "REPLY_WRITE_RETRY_SECONDS": 0.5, "REPLY_LEASE_SECONDS": 0}],
)
def test_reply_whose_database_stays_down_runs_again_when_it_returns(app):
    reply_id = pending_reply(app)
    with hooked(app, "before_cursor_execute", KillAt("UPDATE messages", kill_on=range(1, 1000))):
        assert generate_reply(app, reply_id) == "lost"
    assert reply_row(app, reply_id).status.value in ACTIVE
    # The database is back: the sweep of a live process finds the orphan and runs it again.
    assert sweep_once(app) == [reply_id]
    wait_for_background_work(app)
    reply = reply_row(app, reply_id)
    assert (reply.status, reply.content, reply.error) == (Status.COMPLETE, WORDS, None)


# --- under load, on gunicorn ---------------------------------------------------------------


def app_log(log: str, lines: int = 80) -> str:
    """The app's own log lines (not gunicorn's access log), for failure messages."""
    own = [line for line in log.splitlines() if '" ' not in line or "HTTP/1.1" not in line]
    return "\n".join(own[-lines:])


def no_idle_in_transaction(database) -> list:
    return [row for state in IDLE_IN_TRANSACTION for row in database.backends_in_state(state)]


SERVER_CONFIG = {"RATELIMIT_ENABLED": "false", "REPLY_SWEEP_INTERVAL": 1}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"])
def test_terminating_every_connection_under_load_fails_no_request(
    database_uri,
    postgres_database,
    tmp_path,
):
    with GunicornServer(database_uri, workers=2, threads=8, config=SERVER_CONFIG, log_dir=tmp_path) as server:
        tokens = register_clients(server.url, 6)
        traffic = Traffic(server.url, tokens, reads)
        for token in tokens:
            created = traffic.call("setup", "POST", "/api/v1/conversations", token, {"title": "t"})
            traffic.conversations.append(created.body["id"])
            posted = traffic.call(
                "setup",
                "POST",
                f"/api/v1/conversations/{created.body['id']}/messages",
                token,
                {"content": "some history"},
            )
            assert posted.status == 202
        traffic.calls.clear()
        traffic.start()
        # Terminate every connection of the app, again and again, until several were
        # caught inside a request's transaction (not merely idle in the pool).
        caught, rounds = [], 0
        try:
            time.sleep(0.5)
            while rounds < 20 and sum(state != "idle" for state in caught) < 3:
                caught += postgres_database.terminate_backends()
                rounds += 1
                time.sleep(0.4)
            time.sleep(0.5)
        finally:
            traffic.stop()
        log = server.log_text()
        idle_in_transaction = no_idle_in_transaction(postgres_database)
    mid_request = sum(state != "idle" for state in caught)
    print(
        f"\n{rounds} rounds terminated {len(caught)} backends, {mid_request} mid-request; "
        f"{len(traffic.calls)} requests; retries logged: {log.count('retrying GET')}"
    )
    assert mid_request >= 3, f"the load never had a transaction open when terminated: {caught}"
    failed = [call for call in traffic.calls if not call.ok]
    assert failed == [], f"{len(failed)} of {len(traffic.calls)} requests failed: {failed[:10]}"
    assert idle_in_transaction == []


@pytest.fixture
def proxied(database_uri, postgres_database):
    """A TCP proxy in front of PostgreSQL, and the app's database URI through it."""
    url = sa.make_url(database_uri)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"])
# A refused connection fails at once; an unanswered one must be given up on by the app,
# so that outage lasts longer than pool_timeout plus the slack allowed below.
@pytest.mark.parametrize("mode, outage_seconds", [("refuse", 4.0), ("blackhole", 9.0)])
def test_database_unreachable_for_seconds_under_load(
    mode,
    outage_seconds,
    proxied,
    database_uri,
    postgres_database,
    tmp_path,
):
    proxy, app_uri = proxied
    pool_timeout = 5
    # A POST whose COMMIT landed but whose answer was cut, with the database still gone
    # for the check that follows, gets a 503, and its reply was never handed to a runner:
    # a sweep claims it once it has gone unclaimed for REPLY_LEASE_SECONDS.
    stale_after = 15
    config = {**SERVER_CONFIG, "BOT_ECHO_DELAY": 1.5, "DATABASE_CONNECT_TIMEOUT": 2, "REPLY_WRITE_RETRY_SECONDS": 60}
    with GunicornServer(app_uri, workers=2, threads=8, config=config, log_dir=tmp_path) as server:
        traffic = Traffic(server.url, register_clients(server.url, 4), chats, pause=0.2).start()
        readiness = []
        try:
            time.sleep(2.0)
            # The database goes away: open connections are cut, new ones refused or unanswered.
            outage_started = time.monotonic()
            proxy.set_mode(mode)
            proxy.cut()
            time.sleep(1.0)
            readiness.append(("outage", requests.get(server.url + "/readyz", timeout=30)))
            time.sleep(max(0.0, outage_started + outage_seconds - time.monotonic()))
            proxy.set_mode("pass")
            restored = time.monotonic()
            ready_again = wait_until(
                lambda: requests.get(server.url + "/readyz", timeout=30).status_code == 200,
                15,
            )
            ready_after = time.monotonic() - restored
            time.sleep(max(0.0, restored + 4.0 - time.monotonic()))
        finally:
            traffic.stop()
        # Replies that were generating when the database went away finish once it is back.
        settled = wait_until(lambda: active_replies(database_uri) == 0, stale_after + 25)
        stuck = describe_active_replies(database_uri)
        log = server.log_text()
        idle_in_transaction = no_idle_in_transaction(postgres_database)

    calls = traffic.calls
    during = [c for c in calls if outage_started <= c.started < restored]
    unavailable = [c for c in calls if c.status == 503]
    after = [c for c in calls if c.started >= restored]
    failed_after = [c for c in after if not c.ok]
    last_failure = max((c.started - restored for c in failed_after), default=None)
    in_flight = [a for a in traffic.acked if outage_started - 1.0 <= a.started < outage_started]
    print(
        f"\n[{mode}] {len(calls)} requests, {len(during)} sent during the outage, "
        f"{len(unavailable)} answered 503 (slowest {max((c.seconds for c in unavailable), default=0):.2f} s); "
        f"failures started up to {last_failure if last_failure is None else round(last_failure, 2)} s "
        f"after the database returned; /readyz 200 again after {ready_after:.2f} s; "
        f"{len(traffic.acked)} messages acknowledged, {len(in_flight)} replies in flight at the outage; "
        f"proxy accepted {proxy.accepted} connections"
    )
    # Every answer is a success or a clean 503 in JSON; nothing hangs, nothing is a 500.
    assert all(c.status is not None for c in calls), [c for c in calls if c.status is None][:5]
    assert {c.status for c in calls if not c.ok} <= {503}, [c for c in calls if not c.ok][:5]
    for call in unavailable:
        assert call.body["error"]["code"] in ("database_unavailable", "database_busy"), call.body
        assert call.retry_after
        # A client waits at most pool_timeout for its answer, not for the connect to give up.
        assert call.seconds <= pool_timeout + 2, call
    assert unavailable, "no request noticed the outage"
    assert readiness[0][1].status_code == 503
    assert readiness[0][1].json()["error"]["code"] == "database_unavailable"
    assert ready_again
    # The app recovers by itself: every request succeeds within about 1 s of the database
    # returning (2 s here, for a loaded machine), with no restart.
    assert all(c.ok for c in after if c.started >= restored + 2.0), failed_after
    assert len([c for c in after if c.started >= restored + 2.0]) >= 10
    # Nothing acknowledged was lost; no reply is stuck; complete ones hold their whole text once.
    rows = assert_acked_messages_stored(database_uri, traffic.acked)
    assert in_flight, "no reply was being generated when the database went away"
    assert settled, f"replies still pending or streaming: {stuck}\n{app_log(log)}"
    acked_ids = {item.message_id for item in traffic.acked}
    unacknowledged = [m for m in rows.values() if m.role is Role.USER and m.id not in acked_ids]
    print(
        f"replies acknowledged: {sorted(collections.Counter(rows[a.reply_id].status.value for a in traffic.acked).items())}; "
        f"messages stored though their POST was not acknowledged: {len(unacknowledged)}"
    )
    # The pipeline carried every acknowledged reply through the outage, text whole and once.
    for item in traffic.acked:
        reply = rows[item.reply_id]
        assert (reply.status, reply.content) == (Status.COMPLETE, item.content), reply
    assert "Traceback" not in log, app_log(log)
    assert idle_in_transaction == []


def worker_dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_worker_killed_under_load(backend, database_uri, request, tmp_path):
    # The default lease and sweep: what an operator gets after a crash.
    lease, sweep = 10.0, 2.0
    config = {
        **SERVER_CONFIG,
        "BOT_ECHO_DELAY": 3,
        "REPLY_LEASE_SECONDS": lease,
        "REPLY_SWEEP_INTERVAL": sweep,
        "REPLY_WORKERS": 64,
    }
    with GunicornServer(database_uri, workers=2, threads=8, config=config, log_dir=tmp_path) as server:
        traffic = Traffic(server.url, register_clients(server.url, 4), chats, pause=0.5).start()
        try:
            # Enough replies in flight that both workers are generating some.
            assert wait_until(lambda: active_replies(database_uri) >= 8, 15)
            # The worker generating the most replies: the kernel may have sent every one to
            # the same worker, and killing the other would orphan none.
            victim = busiest_worker(database_uri, server.worker_pids())
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: worker_dead(victim), 10)
            killed = time.monotonic()
            # The master replaces the worker.
            replaced = wait_until(
                lambda: len(pids := server.worker_pids()) == 2 and victim not in pids,
                20,
            )
            time.sleep(max(0.0, killed + 3.0 - time.monotonic()))
        finally:
            traffic.stop()
        # The killed worker's replies are taken over once their leases expire, and finish.
        settled = wait_until(lambda: active_replies(database_uri) == 0, lease + sweep + 30)
        settled_after = time.monotonic() - killed
        stuck = describe_active_replies(database_uri)
        after_replacement = [
            requests.get(
                server.url + "/api/v1/conversations",
                timeout=30,
                headers={"Authorization": f"Bearer {traffic.tokens[0]}", "Connection": "close"},
            )
            for _ in range(6)
        ]
        log = server.log_text()
        idle_in_transaction = (
            no_idle_in_transaction(request.getfixturevalue("postgres_database")) if backend == "postgresql" else []
        )
    calls = traffic.calls
    before = [a for a in traffic.acked if a.started < killed]
    since = [a for a in traffic.acked if a.started >= killed]
    rows = assert_acked_messages_stored(database_uri, traffic.acked)
    # A reply run again after its process died is on a later attempt than it started on.
    taken_over = [a for a in before if rows[a.reply_id].attempt > 0]
    print(
        f"\n[{backend}] {len(calls)} requests; {len(before)} messages acknowledged before the kill, "
        f"{len(since)} after; {len(taken_over)} orphaned replies taken over; no reply in progress "
        f"{settled_after:.1f} s after the kill; requests cut by the kill: "
        f"{[c for c in calls if c.status is None]}"
    )
    assert settled, f"replies still pending or streaming: {stuck}\n{app_log(log)}"
    assert replaced, "the master did not replace the killed worker"
    assert all(r.status_code == 200 for r in after_replacement)
    # Only requests in flight in the killed worker lost their connection: at most one per client.
    cut = [c for c in calls if not c.ok]
    assert all(c.status is None and c.started < killed for c in cut), cut
    assert len(cut) <= len(traffic.tokens)
    # Every acknowledged reply ends complete with its whole text, the orphans included.
    assert taken_over, "no reply was orphaned by the kill"
    for item in traffic.acked:
        reply = rows[item.reply_id]
        assert (reply.status, reply.content, reply.error) == (Status.COMPLETE, item.content, None), reply
    assert since, "no message was acknowledged after the kill"
    assert idle_in_transaction == []
