"""The ceiling for GET /api/v1/conversations/<id>/messages: bare Flask and the raw driver.

The same three statements chatapp runs for that request (the Bearer token with its
user, the conversation's owner check, one page of messages in id order) and the same
JSON, but no ORM, no pool, no Flask-SQLAlchemy, no schema library, no middleware: each
gunicorn thread keeps one driver connection (sqlite3 or psycopg) in a thread-local and
runs the statements in autocommit mode. Nothing a real application would ship
(no pool limits, no reconnects, no metrics); it only says how fast the same work can go.

    gunicorn -c gunicorn.conf.py bench.ceiling_app:app   (CHATAPP_SQLALCHEMY_DATABASE_URI=...)
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

from flask import Flask, Response, request
from sqlalchemy.engine import make_url

URL = make_url(os.environ["CHATAPP_SQLALCHEMY_DATABASE_URI"])
BACKEND = URL.get_backend_name()
_local = threading.local()

TOKEN_SQL = (
    "SELECT users.id FROM api_tokens JOIN users ON users.id = api_tokens.user_id "
    "WHERE api_tokens.token_hash = {p} AND api_tokens.revoked_at IS NULL"
)
CONVERSATION_SQL = "SELECT id FROM conversations WHERE id = {p} AND owner_id = {p}"
MESSAGES_SQL = (
    "SELECT id, conversation_id, role, content, status, error, created_at, updated_at "
    "FROM messages WHERE conversation_id = {p} ORDER BY id LIMIT {p}"
)

if BACKEND == "sqlite":
    import sqlite3

    PARAM = "?"

    def _connect():
        # Autocommit (no implicit BEGIN): each SELECT reads the latest WAL snapshot.
        connection = sqlite3.connect(URL.database, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA busy_timeout = 10000")
        return connection

    def _stamp(value) -> str:
        # Stored by SQLAlchemy as "YYYY-MM-DD HH:MM:SS.ffffff", always UTC here.
        return value.replace(" ", "T") + "+00:00"
else:
    import psycopg

    PARAM = "%s"

    def _connect():
        dsn = URL.set(drivername="postgresql").render_as_string(hide_password=False)
        return psycopg.connect(dsn, autocommit=True)

    def _stamp(value) -> str:
        return value.isoformat()


TOKEN_SQL, CONVERSATION_SQL, MESSAGES_SQL = (sql.format(p=PARAM) for sql in (TOKEN_SQL, CONVERSATION_SQL, MESSAGES_SQL))


def _connection():
    connection = getattr(_local, "connection", None)
    if connection is None:
        connection = _local.connection = _connect()
    return connection


def _error(status: int, code: str, message: str) -> Response:
    return Response(
        json.dumps({"error": {"code": code, "message": message}}), status=status, mimetype="application/json"
    )


app = Flask(__name__)


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.get("/api/v1/conversations/<int:conversation_id>/messages")
def list_messages(conversation_id: int):
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return _error(401, "unauthorized", "authentication required")
    limit = min(max(request.args.get("limit", 20, type=int), 1), 100)
    connection = _connection()
    row = connection.execute(TOKEN_SQL, (hashlib.sha256(token.encode()).hexdigest(),)).fetchone()
    if row is None:
        return _error(401, "invalid_token", "the token is invalid or revoked")
    if connection.execute(CONVERSATION_SQL, (conversation_id, row[0])).fetchone() is None:
        return _error(404, "conversation_not_found", "conversation not found")
    rows = connection.execute(MESSAGES_SQL, (conversation_id, limit + 1)).fetchall()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = str(rows[-1][0])  # not chatapp's opaque cursor; not followed here
    items = [
        {
            "id": r[0],
            "conversation_id": r[1],
            "role": r[2],
            "content": r[3],
            "status": r[4],
            "error": r[5],
            "created_at": _stamp(r[6]),
            "updated_at": _stamp(r[7]),
        }
        for r in rows
    ]
    return Response(json.dumps({"items": items, "next_cursor": next_cursor}), mimetype="application/json")
