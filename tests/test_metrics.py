"""GET /metrics: requests, pool gauges, connection hold time by route or job, replies, bot timing.

Metrics are process-wide (prometheus_client's default registry), so each test compares
values before and after what it does. The multi-process mode used under gunicorn is
tested at the end against a real server.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import requests
import sqlalchemy as sa
from flask import Blueprint
from sqlalchemy import event

from chatapp import create_app
from chatapp.chat.stream import reply_events
from chatapp.chat.sweeper import sweep_once
from chatapp.db import db
from chatapp.ops.metrics import REGISTRY
from tests.conftest import base_test_config
from tests.support import metrics
from tests.support.metrics import total
from tests.support.servers import GunicornServer, free_port

HOLD = "chatapp_db_connection_hold_seconds_count"


def scrape(client, headers=None) -> list:
    """(sample name, labels, value) of every sample from GET /metrics."""
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/plain"
    return metrics.parse(response.get_data(as_text=True))


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"bind": "default"})


@pytest.fixture
def user(auth) -> dict:
    return auth.headers("metrics-user")


# --- requests ---------------------------------------------------------------------------


def test_requests_are_counted_by_route_rule_and_status(client, user):
    created = client.post("/api/v1/conversations", json={"title": "x"}, headers=user).get_json()
    before = scrape(client)
    for _ in range(3):
        assert client.get(f"/api/v1/conversations/{created['id']}", headers=user).status_code == 200
    assert client.get("/api/v1/conversations/999999", headers=user).status_code == 404
    assert client.get("/no/such/page").status_code == 404
    after = scrape(client)

    rule = "/api/v1/conversations/<int:conversation_id>"
    key = "chatapp_http_requests_total"
    assert (
        total(after, key, route=rule, method="GET", status="200")
        - total(before, key, route=rule, method="GET", status="200")
        == 3
    )
    assert (
        total(after, key, route=rule, method="GET", status="404")
        - total(before, key, route=rule, method="GET", status="404")
        == 1
    )
    # Unknown URLs share one label, so a scanner cannot blow up the series count.
    assert (
        total(after, key, route="<unmatched>", status="404") - total(before, key, route="<unmatched>", status="404")
        == 1
    )
    duration = "chatapp_http_request_duration_seconds_count"
    assert total(after, duration, route=rule, method="GET") - total(before, duration, route=rule, method="GET") == 4


def test_every_response_names_a_request_id(client):
    generated = client.get("/healthz")
    assert len(generated.headers["X-Request-ID"]) == 32
    assert client.get("/healthz").headers["X-Request-ID"] != generated.headers["X-Request-ID"]
    echoed = client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.42"})
    assert echoed.headers["X-Request-ID"] == "lb-7f3a.42"
    # An id that could split or forge a log line is replaced, not echoed.
    forged = client.get("/healthz", headers={"X-Request-ID": 'x" 200 0 injected'})
    assert forged.headers["X-Request-ID"] != 'x" 200 0 injected'
    assert len(forged.headers["X-Request-ID"]) == 32
    # Errors get one too.
    assert "X-Request-ID" in client.get("/api/v1/conversations").headers


# --- /metrics itself ----------------------------------------------------------------------


def test_metrics_never_touch_the_database(app, client, user):
    checkouts = []

    def count_checkout(*args):
        checkouts.append(1)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "checkout", count_checkout)
    try:
        scrape(client)
        scrape(client)
        assert checkouts == []
        # The listener does see a request that reads.
        assert client.get("/api/v1/conversations", headers=user).status_code == 200
        assert checkouts
    finally:
        event.remove(engine, "checkout", count_checkout)


@pytest.mark.parametrize("down_uri", ["sqlite", "postgresql"])
def test_metrics_and_health_answer_while_the_database_is_down(tmp_path, down_uri):
    if down_uri == "sqlite":
        uri = f"sqlite:///{tmp_path}/missing-dir/db.sqlite"  # cannot be opened
    else:
        uri = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"  # nothing listens
    app = create_app({**base_test_config(uri), "SQLALCHEMY_ENGINE_OPTIONS": {"pool_timeout": 1}})
    app.instance_path = str(tmp_path / "instance")
    client = app.test_client()
    try:
        assert client.get("/metrics").status_code == 200
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.get_json()["error"]["code"] == "database_unavailable"
        # The API says the same, as JSON, not a 500.
        api = client.post("/api/v1/tokens", json={"username": "alice", "password": "x"})
        assert api.status_code == 503, api.get_data(as_text=True)
        assert api.get_json()["error"]["code"] == "database_unavailable"
        assert api.headers["Retry-After"]
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("extra_config", [{"METRICS_TOKEN": "s3cret-scrape"}])
def test_metrics_token_restricts_scraping(client):
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert refused.get_json()["error"]["code"] == "unauthorized"
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape"}).status_code == 200


def metrics_status(app, remote_addr: str, headers: dict | None = None) -> int:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = remote_addr
    return client.get("/metrics", headers=headers or {}).status_code


FORWARDED = [{"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"}, {"X-Real-IP": "127.0.0.1"}]


def test_metrics_answer_only_local_requests_by_default(app):
    """No token: loopback callers read metrics; anyone else, or anything through a proxy, gets 403."""
    for local in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert metrics_status(app, local) == 200, local
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = "203.0.113.7"
    refused = client.get("/metrics")
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "forbidden"
    assert "METRICS_TOKEN" in refused.get_json()["error"]["message"]
    assert "chatapp_" not in refused.get_data(as_text=True)
    for remote in ("10.0.0.5", "::2", "0.0.0.0", "fe80::1"):
        assert metrics_status(app, remote) == 403, remote
    # A reverse proxy on this host connects from loopback for every client: a request that
    # says it was forwarded is not local, whatever address it names.
    for headers in FORWARDED:
        assert metrics_status(app, "127.0.0.1", headers) == 403, headers


@pytest.mark.parametrize("extra_config", [{"PROXY_FIX_X_FOR": 1}])
def test_a_client_behind_the_trusted_proxy_cannot_pass_for_local(app):
    assert metrics_status(app, "127.0.0.1", {"X-Forwarded-For": "127.0.0.1"}) == 403
    assert metrics_status(app, "127.0.0.1") == 200  # the host itself, not through the proxy


@pytest.mark.parametrize("extra_config", [{"METRICS_PUBLIC": True}])
def test_metrics_public_opens_them_to_everyone(app):
    assert metrics_status(app, "203.0.113.7") == 200
    assert metrics_status(app, "127.0.0.1", FORWARDED[0]) == 200


@pytest.mark.parametrize("extra_config", [{"METRICS_TOKEN": "s3cret-scrape"}])
def test_with_a_token_the_token_alone_decides(app):
    bearer = {"Authorization": "Bearer s3cret-scrape"}
    assert metrics_status(app, "127.0.0.1") == 401  # loopback is not enough
    assert metrics_status(app, "203.0.113.7", bearer) == 200
    assert metrics_status(app, "127.0.0.1", {**bearer, **FORWARDED[0]}) == 200


@pytest.mark.parametrize("extra_config", [{"METRICS_ENABLED": False}])
def test_metrics_can_be_switched_off(client):
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


# --- the pool and connection hold time ---------------------------------------------------------

probe = Blueprint("metrics_probe", __name__)
seen: dict = {}


@probe.get("/probe/pool")
def pool_probe():
    """Read the pool gauges while this request holds one connection, then two."""
    db.session.execute(sa.select(1))
    seen["checked_out_one"] = gauge("chatapp_db_pool_checked_out")
    with db.engine.connect() as second:
        second.execute(sa.select(1))
        seen["checked_out_two"] = gauge("chatapp_db_pool_checked_out")
        seen["overflow_two"] = gauge("chatapp_db_pool_overflow")
    return {}


@probe.get("/probe/slow-hold")
def slow_hold():
    """Break rule 2 on purpose: keep the connection across a sleep."""
    db.session.execute(sa.select(1))
    time.sleep(0.3)
    return {}


@pytest.fixture
def probed(app):
    app.register_blueprint(probe)
    seen.clear()
    return app


@pytest.mark.parametrize(
    "extra_config",
    [{"SQLALCHEMY_ENGINE_OPTIONS": {"pool_size": 1, "max_overflow": 2, "pool_timeout": 5}}],
)
def test_pool_gauges_follow_checkouts(probed, client):
    assert client.get("/probe/pool").status_code == 200
    assert seen == {"checked_out_one": 1, "checked_out_two": 2, "overflow_two": 1}
    # Back to idle: nothing checked out, and the connection beyond pool_size was closed.
    assert gauge("chatapp_db_pool_checked_out") == 0
    assert gauge("chatapp_db_pool_overflow") == 0
    assert gauge("chatapp_db_pool_size") == 1
    samples = scrape(client)
    assert total(samples, "chatapp_db_pool_size", bind="default") == 1


def test_hold_time_is_labelled_by_route_and_by_job(app, client, user, runner):
    before = scrape(client)
    conversation = client.post("/api/v1/conversations", json={}, headers=user).get_json()
    posted = client.post(
        f"/api/v1/conversations/{conversation['id']}/messages", json={"content": "hello there"}, headers=user
    ).get_json()
    app.extensions["chatapp.reply_runner"].wait_idle(30)
    stream = client.get(
        f"/api/v1/conversations/{conversation['id']}/messages/{posted['reply']['id']}/stream", headers=user
    )
    assert "hello there" in stream.get_data(as_text=True)
    # The view read the finished reply itself; a generator not given that first read
    # reads in a job of its own.
    assert "hello there" in "".join(reply_events(app, posted["reply"]["id"]))
    sweep_once(app)
    result = runner.invoke(args=["create-user", "carol", "--password-stdin"], input="correct horse\n")
    assert result.exit_code == 0, result.output
    after = scrape(client)

    def grew(holder: str) -> float:
        return total(after, HOLD, holder=holder) - total(before, HOLD, holder=holder)

    assert grew("/api/v1/conversations") >= 1
    assert grew("/api/v1/conversations/<int:conversation_id>/messages") >= 1
    assert grew("/api/v1/conversations/<int:conversation_id>/messages/<int:reply_id>/stream") >= 1
    assert grew("job:reply") >= 2  # reads the history, then writes the answer
    assert grew("job:stream") >= 1
    assert grew("job:sweeper") == 1
    assert grew("job:cli") >= 1


@pytest.mark.parametrize("extra_config", [{"HOLD_WARN_SECONDS": 0.2}])
def test_a_long_hold_logs_a_warning_naming_the_route(probed, client, caplog):
    with caplog.at_level(logging.WARNING, logger="chatapp.ops.metrics"):
        response = client.get("/probe/slow-hold", headers={"X-Request-ID": "hold-probe-1"})
    assert response.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "chatapp.ops.metrics"]
    assert len(warnings) == 1, warnings
    assert "/probe/slow-hold" in warnings[0] and "hold-probe-1" in warnings[0]


@pytest.mark.parametrize("extra_config", [{"HOLD_WARN_SECONDS": 30}])
def test_a_hold_under_the_threshold_logs_nothing(probed, client, caplog):
    with caplog.at_level(logging.WARNING, logger="chatapp.ops.metrics"):
        assert client.get("/probe/slow-hold").status_code == 200
    assert [r for r in caplog.records if r.name == "chatapp.ops.metrics"] == []


# --- replies and the bot -------------------------------------------------------------------------


def _post_and_wait(app, client, headers) -> dict:
    conversation = client.post("/api/v1/conversations", json={}, headers=headers).get_json()
    posted = client.post(
        f"/api/v1/conversations/{conversation['id']}/messages", json={"content": "one two three"}, headers=headers
    )
    assert posted.status_code == 202
    assert app.extensions["chatapp.reply_runner"].wait_idle(30)
    return posted.get_json()


def test_replies_and_bot_timing_are_recorded(app, client, user):
    before = scrape(client)
    _post_and_wait(app, client, user)
    after = scrape(client)
    assert (
        total(after, "chatapp_replies_total", status="complete")
        - total(before, "chatapp_replies_total", status="complete")
        == 1
    )
    for name in ("chatapp_bot_first_token_seconds_count", "chatapp_bot_reply_seconds_count"):
        assert total(after, name) - total(before, name) == 1


@pytest.mark.parametrize(
    "extra_config",
    [{"BOT_ENGINE": "openai", "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1", "OPENAI_CONNECT_TIMEOUT": 2}],
)
def test_a_failed_reply_is_counted_as_failed_with_no_bot_time(app, client, user):
    before = scrape(client)
    _post_and_wait(app, client, user)
    after = scrape(client)
    assert (
        total(after, "chatapp_replies_total", status="failed") - total(before, "chatapp_replies_total", status="failed")
        == 1
    )
    for name in ("chatapp_bot_first_token_seconds_count", "chatapp_bot_reply_seconds_count"):
        assert total(after, name) == total(before, name)


# --- multi-process mode under gunicorn ---------------------------------------------------------


def _token(server: GunicornServer, username: str) -> dict:
    credentials = {"username": username, "password": "correct horse"}
    assert requests.post(server.url + "/api/v1/users", json=credentials, timeout=10).status_code == 201
    token = requests.post(server.url + "/api/v1/tokens", json=credentials, timeout=10).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def _scrape_url(url: str) -> list:
    response = requests.get(url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text[:500]
    return metrics.parse(response.text)


@pytest.mark.slow
def test_gunicorn_workers_report_together(database_uri, tmp_path):
    # No periodic sweep: a worker starts one when it boots, and a scrape that lands
    # during its pass would see its connection checked out.
    config = {"REPLY_SWEEP_INTERVAL": 0}
    with GunicornServer(database_uri, workers=2, threads=4, config=config, log_dir=tmp_path) as server:
        headers = _token(server, "multi")
        # A fresh connection per request spreads them over both workers.
        for _ in range(40):
            response = requests.get(server.url + "/api/v1/conversations", headers=headers, timeout=10)
            assert response.status_code == 200
        workers = set(server.worker_pids())
        # Whichever worker answers the scrape, it reports every worker's counts.
        for _ in range(4):
            samples = _scrape_url(server.url)
            assert (
                total(samples, "chatapp_http_requests_total", route="/api/v1/conversations", method="GET", status="200")
                == 40
            )
        pids = set(metrics.by_label(samples, "chatapp_db_pool_checked_out", "pid"))
        assert pids and pids <= {str(pid) for pid in workers}
        assert total(samples, "chatapp_db_pool_checked_out") == 0

        # A worker that dies stops reporting its pool (gunicorn.conf.py child_exit); its
        # replacement reports its own once it has served a request that used the database.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGTERM)
        served = 40
        # Until the replacement has booted and served (seconds on a loaded machine): a bound.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            response = requests.get(server.url + "/api/v1/conversations", headers=headers, timeout=10)
            assert response.status_code == 200
            served += 1
            samples = _scrape_url(server.url)
            pids = set(metrics.by_label(samples, "chatapp_db_pool_checked_out", "pid"))
            live = {str(pid) for pid in server.worker_pids()}
            if len(live) == 2 and str(victim) not in live and live <= pids:
                break
        assert str(victim) not in pids and live <= pids, (victim, pids, live)
        # Counters of the dead worker are kept: those requests happened.
        assert (
            total(samples, "chatapp_http_requests_total", route="/api/v1/conversations", method="GET", status="200")
            == served
        )
