"""Prometheus metrics: requests, the pool, how long connections are held, replies, the bot.

Metrics live in prometheus_client's default registry. Under gunicorn, gunicorn.conf.py
sets PROMETHEUS_MULTIPROC_DIR before anything imports prometheus_client, so every worker
writes its values to files there and GET /metrics (answered by any one worker) adds them
up. Nothing here touches the database: pool figures come from the pool's own counters,
updated on its checkout and checkin events.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hmac
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterator

import click
from flask import Blueprint, Flask, Response, abort, current_app, g, has_request_context, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from sqlalchemy import event

from chatapp.db import transaction
from chatapp.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_HOLD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)

REQUESTS = Counter(
    "chatapp_http_requests_total",
    "Requests answered, by route rule, method and status.",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "chatapp_http_request_duration_seconds",
    "Time to produce a response (a streamed body is not included), by route rule and method.",
    ["route", "method"],
)
# "liveall": under gunicorn each live worker reports its own pool, with a pid label.
POOL_SIZE = Gauge("chatapp_db_pool_size", "Configured pool size.", ["bind"], multiprocess_mode="liveall")
POOL_CHECKED_OUT = Gauge(
    "chatapp_db_pool_checked_out",
    "Connections checked out of the pool now.",
    ["bind"],
    multiprocess_mode="liveall",
)
POOL_OVERFLOW = Gauge(
    "chatapp_db_pool_overflow",
    "Connections open beyond pool_size (up to max_overflow).",
    ["bind"],
    multiprocess_mode="liveall",
)
CONNECTION_HOLD_SECONDS = Histogram(
    "chatapp_db_connection_hold_seconds",
    "How long each checkout kept its connection, by the route rule or job that held it.",
    ["holder"],
    buckets=_HOLD_BUCKETS,
)
REPLIES = Counter("chatapp_replies_total", "Replies that finished, by final status.", ["status"])
# Queue mode (chatapp/chat/queue.py), observed in the Celery workers.
QUEUE_WAIT_SECONDS = Histogram(
    "chatapp_reply_queue_wait_seconds",
    "Time from a reply's enqueue to the start of its job in a worker.",
    buckets=_BOT_BUCKETS,
)
QUEUE_JOBS = Counter(
    "chatapp_reply_queue_jobs_total",
    "Reply jobs run by queue workers, by outcome: complete, failed, stopped, duplicate (the "
    "reply was finished or taken already), handed_over, ...; 'redelivered' counts deliveries "
    "Redis made again.",
    ["outcome"],
)
LEASE_STATEMENTS = Counter(
    "chatapp_reply_lease_statements_total",
    "Statements of the lease keeper: 'renew' (an UPDATE for all of a process's replies) or "
    "'check' (a read that notices stops).",
    ["kind"],
)
BOT_FIRST_TOKEN_SECONDS = Histogram(
    "chatapp_bot_first_token_seconds",
    "From asking the bot to its first chunk of text.",
    buckets=_BOT_BUCKETS,
)
BOT_TOTAL_SECONDS = Histogram(
    "chatapp_bot_reply_seconds",
    "From asking the bot to its last chunk of text.",
    buckets=_BOT_BUCKETS,
)

# Labelled children by (metric, labels). metric.labels() validates and locks on every
# call; the label sets are few (route rules x methods x statuses, holders), so each is
# looked up once. Same children as labels() returns, so scrapes see the same values.
_CHILDREN: dict = {}


def _child(metric, *labels):
    """metric.labels(*labels), looked up once per label set."""
    key = (metric, labels)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*labels)
    return child


# What is running outside a request: "reply", "stream", "lease", "sweeper", "title"; "cli" is detected.
_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("chatapp_job", default=None)


@contextlib.contextmanager
def job(name: str) -> Iterator[None]:
    """Label database work done inside the block (or the decorated function) as job ``name``."""
    token = _job.set(name)
    try:
        yield
    finally:
        _job.reset(token)


def current_holder() -> str:
    """Who is taking a connection: the request's route rule, else the job."""
    if has_request_context():
        rule = request.url_rule
        return rule.rule if rule is not None else "<unmatched>"
    name = _job.get()
    if name is None and click.get_current_context(silent=True) is not None:
        name = "cli"
    return f"job:{name or 'other'}"


# --- the reply pipeline ---------------------------------------------------------------


def reply_job(generate):
    """Decorate generate_reply: label its database work and count its final status."""

    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        with job("reply"):
            try:
                status = generate(*args, **kwargs)
            except BaseException:
                REPLIES.labels("crashed").inc()
                raise
        REPLIES.labels(str(status)).inc()
        return status

    return wrapper


def timed_bot_stream(chunks: Iterator[str]) -> Iterator[str]:
    """Pass a bot's chunks through, timing the first one and the whole answer."""
    started = time.perf_counter()
    first = True
    completed = False
    try:
        for chunk in chunks:
            if first:
                BOT_FIRST_TOKEN_SECONDS.observe(time.perf_counter() - started)
                first = False
            yield chunk
        completed = True
    finally:
        # Replies cut short (deleted, regenerated, failed) are not answer times.
        if completed:
            BOT_TOTAL_SECONDS.observe(time.perf_counter() - started)


# --- the pool ---------------------------------------------------------------------------


def _watch_engine(engine, bind: str, warn_after: float) -> None:
    pool = engine.pool
    # Counted here rather than read from pool.checkedout(): the checkin event fires
    # before the pool takes the connection back, and a gauge last set then would
    # show an idle worker holding a connection forever.
    lock = threading.Lock()
    held = {"count": 0}
    # The bind label never changes: look the gauges' children up once, not on every
    # checkout and checkin (prometheus_client's values follow a fork by themselves).
    checked_out_gauge = POOL_CHECKED_OUT.labels(bind)
    size_gauge, overflow_gauge = POOL_SIZE.labels(bind), POOL_OVERFLOW.labels(bind)
    # StaticPool (in-memory SQLite) has no queue, no size and no overflow.
    queued = hasattr(pool, "overflow")

    # Under gunicorn every set() is a write to this worker's metrics file (a lock, a
    # pid check, a pack into the mmap). The size never changes and the overflow seldom
    # does: each is written when its value changes (or in a new process, whose files
    # start empty), not on every checkout and checkin.
    written: dict = {}

    def set_if_changed(gauge, value, pid) -> None:
        if written.get(gauge) != (pid, value):
            gauge.set(value)
            written[gauge] = (pid, value)

    def record_pool(returning: bool) -> None:
        checked_out_gauge.set(held["count"])
        if queued:
            overflow = pool.overflow()
            if returning and pool.checkedin() >= pool.size():
                overflow -= 1  # the pool is full: it closes the connection coming back
            pid = os.getpid()
            set_if_changed(size_gauge, pool.size(), pid)
            set_if_changed(overflow_gauge, max(overflow, 0), pid)

    @event.listens_for(engine, "checkout")
    def on_checkout(dbapi_connection, record, proxy):
        with lock:
            if "chatapp.checkout" not in record.info:
                held["count"] += 1
            record.info["chatapp.checkout"] = (time.perf_counter(), current_holder(), _request_id())
            record_pool(returning=False)

    @event.listens_for(engine, "checkin")
    def on_checkin(dbapi_connection, record):
        with lock:
            checkout = record.info.pop("chatapp.checkout", None)
            if checkout is not None:
                held["count"] -= 1
            record_pool(returning=True)
        if checkout is None:
            return
        started, holder, request_id = checkout
        seconds = time.perf_counter() - started
        _child(CONNECTION_HOLD_SECONDS, holder).observe(seconds)
        if seconds > warn_after:
            log.warning(
                "database connection held %.2f s by %s%s (over HOLD_WARN_SECONDS=%g)",
                seconds,
                holder,
                f" (request {request_id})" if request_id else "",
                warn_after,
            )


def _request_id() -> str | None:
    return g.get("request_id") if has_request_context() else None


# --- requests ---------------------------------------------------------------------------


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _record_request(response: Response) -> Response:
    rule = request.url_rule
    route = rule.rule if rule is not None else "<unmatched>"
    method = request.method
    if method not in _METHODS:
        method = "OTHER"
    _child(REQUESTS, route, method, str(response.status_code)).inc()
    started = g.get("metrics_started")
    if started is not None:
        _child(REQUEST_SECONDS, route, method).observe(time.perf_counter() - started)
    return response


def _registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One worker answers the scrape; the collector reads every worker's files.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


# Headers a proxy adds to name the client it forwards for. Behind a proxy on the same host
# every client connects from loopback, so a request carrying one is never taken as local.
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def _is_local_scrape() -> bool:
    """A request straight from this host: a loopback address and no proxy's forwarding header."""
    if any(name in request.headers for name in _PROXY_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False  # not an IP address (a Unix socket): nothing says who is calling
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@bp.get("/metrics")
@transaction("none")
def metrics():
    """Prometheus text format; reads counters only, never the database."""
    config = current_app.config
    if not config["METRICS_ENABLED"]:
        abort(404)
    token = config["METRICS_TOKEN"]
    if token:
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("send 'Authorization: Bearer <METRICS_TOKEN>' to read metrics")
    elif not config["METRICS_PUBLIC"] and not _is_local_scrape():
        # Route names, request counts and pool sizes are for the operator, not for anyone
        # who finds the URL.
        raise Forbidden(
            "metrics are served only to requests from this host; set METRICS_TOKEN to scrape from elsewhere"
        )
    body = generate_latest(_registry())
    # Queue mode samples the queue's depth now (chatapp/chat/queue.py).
    extra = getattr(current_app.extensions.get("chatapp.reply_runner"), "metrics_text", None)
    if extra is not None:
        body += extra()
    return Response(body, mimetype=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Time every request and watch every engine's pool; call after db.init_app."""
    from chatapp.db import db

    # First of all before_request functions, so that a request refused by an earlier
    # hook (CSRF, rate limit) is still timed.
    app.before_request_funcs.setdefault(None, []).insert(0, _start_timer)
    app.after_request(_record_request)
    warn_after = float(app.config["HOLD_WARN_SECONDS"])
    with app.app_context():  # engines connect lazily: no database is touched here
        for key, engine in db.engines.items():
            _watch_engine(engine, key or "default", warn_after)
    app.register_blueprint(bp)
