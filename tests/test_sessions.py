"""The session lifecycle: one session per unit of work, removed on every path."""

import threading

import pytest
import sqlalchemy as sa
from flask import Blueprint, abort

from chatapp.auth.models import User
from chatapp.db import db, unit_of_work
from tests.helpers import assert_no_leaks, checked_out, live_sessions

probe = Blueprint("probe", __name__)
seen_sessions: list = []
barrier_holder: dict = {}


@probe.get("/probe/session")
def session_probe():
    """Record the request's session and use its connection."""
    session = db.session()
    seen_sessions.append(session)
    db.session.execute(sa.select(1))
    if "barrier" in barrier_holder:
        barrier_holder["barrier"].wait(timeout=10)
    return {"session": id(session)}


@probe.post("/probe/fail-after-write")
def fail_after_write():
    """Write, flush, then crash before the commit boundary."""
    db.session.add(User(username="ghost", password_hash="x"))
    db.session.flush()
    raise RuntimeError("boom after flush")


@probe.post("/probe/reject-after-write")
def reject_after_write():
    """Write, flush, then answer 4xx."""
    db.session.add(User(username="ghost", password_hash="x"))
    db.session.flush()
    abort(422)


@probe.post("/probe/commit")
def commit_user():
    """Write and commit at the view boundary."""
    db.session.add(User(username="kept", password_hash="x"))
    db.session.commit()
    return {"ok": True}, 201


@pytest.fixture
def probed_app(app):
    app.register_blueprint(probe)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    seen_sessions.clear()
    barrier_holder.clear()
    return app


def usernames(app) -> list[str]:
    with unit_of_work(app, write=False) as session:
        return list(session.scalars(sa.select(User.username).order_by(User.username)))


def test_each_request_gets_its_own_session(probed_app):
    client = probed_app.test_client()
    for _ in range(3):
        assert client.get("/probe/session").status_code == 200
        assert_no_leaks(probed_app)
    assert len({id(session) for session in seen_sessions}) == 3


def test_concurrent_requests_on_threads_get_distinct_sessions(probed_app):
    workers = 4
    barrier_holder["barrier"] = threading.Barrier(workers)
    errors = []

    def call():
        try:
            assert probed_app.test_client().get("/probe/session").status_code == 200
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert not errors
    # All four were alive at the barrier at once, each with its own session.
    assert len({id(session) for session in seen_sessions}) == workers
    assert_no_leaks(probed_app)


def test_view_that_raises_writes_nothing_and_releases_everything(probed_app):
    response = probed_app.test_client().post("/probe/fail-after-write")
    assert response.status_code == 500
    assert "boom" not in response.get_data(as_text=True)
    assert live_sessions() == 0 and checked_out(probed_app) == 0
    assert usernames(probed_app) == []


def test_view_that_answers_4xx_writes_nothing_and_releases_everything(probed_app):
    assert probed_app.test_client().post("/probe/reject-after-write").status_code == 422
    assert live_sessions() == 0 and checked_out(probed_app) == 0
    assert usernames(probed_app) == []


def test_commit_at_the_view_boundary_persists(probed_app):
    assert probed_app.test_client().post("/probe/commit").status_code == 201
    assert usernames(probed_app) == ["kept"]


def test_unit_of_work_on_another_thread(app):
    outcome = {}

    def work():
        with unit_of_work(app) as session:
            outcome["session"] = session
            outcome["checked_out_inside"] = checked_out_now()
            session.add(User(username="threaded", password_hash="x"))
        outcome["live_after"] = live_sessions()

    def checked_out_now():
        return sum(engine.pool.checkedout() for engine in db.engines.values())

    with app.app_context():
        main_session = db.session()
        thread = threading.Thread(target=work)
        thread.start()
        thread.join(10)
        assert outcome["session"] is not main_session
        db.session.remove()
    assert outcome["checked_out_inside"] == 1
    # Only the main thread's own session was left in the registry.
    assert outcome["live_after"] == 1
    assert checked_out(app) == 0
    assert usernames(app) == ["threaded"]


def test_unit_of_work_rolls_back_on_error(app):
    def work():
        with unit_of_work(app) as session:
            session.add(User(username="doomed", password_hash="x"))
            session.flush()
            raise ValueError("fail inside the unit of work")

    errors = []

    def run():
        try:
            work()
        except ValueError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert len(errors) == 1
    assert checked_out(app) == 0 and live_sessions() == 0
    assert usernames(app) == []


def test_unit_of_work_needs_an_app():
    with pytest.raises(RuntimeError, match="app context"):
        with unit_of_work():
            pass


def test_no_connection_idle_in_transaction_after_a_batch_of_requests(probed_app, request):
    if probed_app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        pytest.skip("pg_stat_activity is PostgreSQL's")
    database = request.getfixturevalue("postgres_database")
    client = probed_app.test_client()
    for _ in range(20):
        assert client.get("/probe/session").status_code == 200
        client.post("/probe/fail-after-write")
        client.post("/probe/reject-after-write")
    # The pool keeps connections open, but none of them inside a transaction.
    assert database.backends_in_state("idle in transaction") == []
    assert database.backends_in_state("idle in transaction (aborted)") == []
