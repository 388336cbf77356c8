"""Retry a read-only request once when its database connection dies under it.

``pool_pre_ping`` replaces connections that died while idle in the pool, but not one
that dies while a request holds it (the server restarts, an operator terminates
backends, a failover): the request's next statement fails, its transaction is gone,
and SQLAlchemy cannot resume it. The remedy SQLAlchemy documents is to rerun the
whole unit of work from its start. For a GET that is the whole request, and running
it again is harmless, so this middleware does it, once. Anything else (POST, PATCH,
DELETE) is never rerun: its commit may already have happened.

A disconnect is noted on the WSGI environ by the engines' ``handle_error`` event,
which SQLAlchemy fires with its own verdict on whether the error was a disconnect.
A request that then ends in a 5xx (the 503 of chatapp.errors.handlers) is run again on
a fresh session, whose first checkout pre-pings its way to a live connection.
A failure to connect at all is not noted: the database is down, and a second try
would only double the wait for the same 503.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from flask import Flask, has_request_context, request
from sqlalchemy import event

log = logging.getLogger(__name__)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Set on the WSGI environ by _note_disconnect, read by RetryReadsOnce.
DISCONNECTED = "chatapp.database_disconnected"


def _note_disconnect(context: sa.engine.ExceptionContext) -> None:
    if (
        context.is_disconnect
        and context.connection is not None  # None: connecting failed, the database is down
        and not context.is_pre_ping  # the pool recovers from a failed ping by itself
        and has_request_context()
    ):
        request.environ[DISCONNECTED] = True


class RetryReadsOnce:
    """WSGI middleware: rerun a safe request whose connection died and that failed for it."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") not in SAFE_METHODS:
            return self.wsgi_app(environ, start_response)
        held: list = []

        def hold(status, headers, exc_info=None):
            # Keep the first attempt's status line until we know whether it is sent.
            held[:] = [status, headers, exc_info]
            return _unbuffered_write

        body = self.wsgi_app(environ, hold)
        # Flask calls start_response before returning its body, so held is set here.
        if environ.pop(DISCONNECTED, False) and held and held[0][:1] == "5":
            if hasattr(body, "close"):
                body.close()
            log.warning(
                "retrying %s %s once: its database connection was lost",
                environ.get("REQUEST_METHOD"),
                environ.get("PATH_INFO"),
            )
            return self.wsgi_app(environ, start_response)
        start_response(*held)
        return body


def _unbuffered_write(data: bytes) -> None:
    raise RuntimeError("RetryReadsOnce does not support the WSGI write() callable")


def init_app(app: Flask, engines: list[sa.Engine]) -> None:
    for engine in engines:
        event.listen(engine, "handle_error", _note_disconnect)
    app.wsgi_app = RetryReadsOnce(app.wsgi_app)  # type: ignore[method-assign]  # Flask's documented way
