"""One error shape for the whole app: JSON under /api, an HTML page elsewhere."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from flask import Flask, jsonify, render_template, request
from markupsafe import escape
from werkzeug.exceptions import HTTPException

from chatapp.db import remove_session
from chatapp.errors import AppError

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 2


# Werkzeug's names become short snake_case codes: "Not Found" -> "not_found".
def _code_for(status: int, name: str) -> str:
    return {413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid"}.get(
        status, name.lower().replace(" ", "_").replace("'", "")
    )


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in ("/readyz", "/metrics")


def error_response(
    status: int, code: str, message: str, headers: dict | None = None, fields: dict[str, list[str]] | None = None
):
    # Whatever failed, its transaction ends before the answer is built: no error page or
    # JSON body is rendered holding a connection, let alone SQLite's write lock. Ending
    # the session (not a rollback) keeps the loaded user readable for the page's header.
    remove_session()
    if wants_json():
        error: dict[str, object] = {"code": code, "message": message}
        if fields:
            error["fields"] = fields
        response = jsonify({"error": error})
    else:
        try:
            body = render_template("error.html", status=status, code=code, message=message)
        except Exception:  # noqa: BLE001
            # The page itself can fail, e.g. Flask-Login reloading the user while the
            # database is down: answer the original error in plain HTML instead.
            log.warning("could not render the error page for %s", status, exc_info=True)
            body = f"<!doctype html><title>{status}</title><h1>{status}</h1><p>{escape(message)}</p>"
        response = Flask.response_class(body, mimetype="text/html")
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _validation_message(error: HTTPException) -> tuple[str, str]:
    """webargs puts {"json": {"field": ["msg"]}} on the exception; name the first field."""
    messages = (getattr(error, "data", None) or {}).get("messages") or {}
    for location, fields in messages.items():
        if isinstance(fields, dict):
            for field, problems in fields.items():
                text = problems[0] if isinstance(problems, list) and problems else problems
                if isinstance(text, dict):  # nested field
                    text = next(iter(text.values()), "invalid")
                    text = text[0] if isinstance(text, list) else text
                where = "query parameter" if location == "query" else "field"
                return f"{where} '{field}': {text}", str(field)
        elif isinstance(fields, list) and fields:
            return str(fields[0]), location
    return "the request is not valid", ""


def handle_http_exception(error: HTTPException):
    status = error.code or 500
    headers = dict(error.get_headers()) if status in (405,) else {}
    headers.pop("Content-Type", None)
    if status == 422:
        message, _field = _validation_message(error)
        return error_response(422, "invalid", message)
    if status == 400 and (getattr(error, "data", None) or {}).get("messages"):
        message, _field = _validation_message(error)
        return error_response(400, "bad_request", message)
    if status >= 500:
        return error_response(status, "internal_error", "something went wrong on our side; try again")
    message = {
        404: "no such resource; check the URL",
        405: f"method {request.method} is not allowed here",
        413: "the request body is larger than 1 MB",
        415: "send the body as JSON with Content-Type: application/json",
        # Flask-Limiter's description is the limit hit, e.g. "10 per 1 minute".
        429: f"too many requests (limit: {error.description}); retry after Retry-After seconds",
    }.get(status, error.description or error.name)
    return error_response(status, _code_for(status, error.name), message, headers)


def handle_app_error(error: AppError):
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return error_response(error.status, error.code, error.message, headers, fields=error.fields)


def handle_pool_timeout(error: sa.exc.TimeoutError):
    log.warning("database pool exhausted on %s %s", request.method, request.path)
    return error_response(
        503,
        "database_busy",
        "the server is busy; retry in a moment",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def handle_database_down(error: sa.exc.DBAPIError):
    log.warning("database unavailable on %s %s: %s", request.method, request.path, error.orig)
    return error_response(
        503,
        "database_unavailable",
        "the database is unavailable; retry in a moment",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def handle_lost_connection(error: sa.exc.DBAPIError):
    # Drivers report a dropped connection under several classes (psycopg's
    # InterfaceError, sqlite3's ProgrammingError); SQLAlchemy's verdict is what counts.
    if not error.connection_invalidated:
        raise error  # a bug or a constraint, not an outage: Flask's usual 500
    return handle_database_down(error)


def init_app(app: Flask) -> None:
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(AppError, handle_app_error)
    app.register_error_handler(sa.exc.TimeoutError, handle_pool_timeout)
    app.register_error_handler(sa.exc.OperationalError, handle_database_down)
    app.register_error_handler(sa.exc.DBAPIError, handle_lost_connection)
