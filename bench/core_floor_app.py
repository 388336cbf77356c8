"""A floor for GET /api/v1/conversations/<id>/messages: bare Flask and SQLAlchemy Core.

The ceiling's route (bench/ceiling_app.py) with SQLAlchemy Core on a plain engine in
place of the raw driver: the same three statements and the same JSON, no ORM, no
Flask-SQLAlchemy, no hooks. Core floor minus ceiling is what SQLAlchemy itself costs;
chatapp minus core floor is what its session, hooks and API layer cost.

    gunicorn -c gunicorn.conf.py bench.core_floor_app:app   (CHATAPP_SQLALCHEMY_DATABASE_URI=...)
"""

from __future__ import annotations

import hashlib
import json
import os

import sqlalchemy as sa
from flask import Flask, Response, request

from chatapp.auth.models import ApiToken, User
from chatapp.chat.models import Conversation, Message


def build_core_floor(database_uri: str):
    """The ceiling's route with SQLAlchemy Core in place of the raw driver: (app, engine).

    A plain engine (default pool, a checkout per request), chatapp's tables (so the same
    column types: UTC datetimes, enums), statements built once with bind parameters.
    No ORM, no Flask-SQLAlchemy, no hooks; the ceiling's JSON.
    """
    tokens, users = ApiToken.__table__, User.__table__
    conversations, messages = Conversation.__table__, Message.__table__
    token_sql = (
        sa.select(users.c.id)
        .select_from(tokens.join(users, users.c.id == tokens.c.user_id))
        .where(tokens.c.token_hash == sa.bindparam("token_hash"), tokens.c.revoked_at.is_(None))
    )
    conversation_sql = sa.select(conversations.c.id).where(
        conversations.c.id == sa.bindparam("conversation_id"),
        conversations.c.owner_id == sa.bindparam("owner_id"),
    )
    messages_sql = (
        sa.select(
            messages.c.id,
            messages.c.conversation_id,
            messages.c.role,
            messages.c.content,
            messages.c.status,
            messages.c.error,
            messages.c.created_at,
            messages.c.updated_at,
        )
        .where(messages.c.conversation_id == sa.bindparam("conversation_id"))
        .order_by(messages.c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )
    engine = sa.create_engine(database_uri)
    app = Flask("core_floor")

    def error(status: int, code: str, message: str) -> Response:
        return Response(
            json.dumps({"error": {"code": code, "message": message}}), status=status, mimetype="application/json"
        )

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/api/v1/conversations/<int:conversation_id>/messages")
    def list_messages(conversation_id: int):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return error(401, "unauthorized", "authentication required")
        limit = min(max(request.args.get("limit", 20, type=int), 1), 100)
        with engine.connect() as connection:
            user_id = connection.execute(token_sql, {"token_hash": hashlib.sha256(token.encode()).hexdigest()}).scalar()
            if user_id is None:
                return error(401, "invalid_token", "the token is invalid or revoked")
            if (
                connection.execute(conversation_sql, {"conversation_id": conversation_id, "owner_id": user_id}).scalar()
                is None
            ):
                return error(404, "conversation_not_found", "conversation not found")
            rows = connection.execute(messages_sql, {"conversation_id": conversation_id, "limit": limit + 1}).all()
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = str(rows[-1].id)  # as the ceiling's: not chatapp's opaque cursor
        items = [
            {
                "id": r.id,
                "conversation_id": r.conversation_id,
                "role": r.role.value,
                "content": r.content,
                "status": r.status.value,
                "error": r.error,
                "created_at": r.created_at.isoformat(),
                "updated_at": r.updated_at.isoformat(),
            }
            for r in rows
        ]
        return Response(json.dumps({"items": items, "next_cursor": next_cursor}), mimetype="application/json")

    return app, engine


if "CHATAPP_SQLALCHEMY_DATABASE_URI" in os.environ:  # under gunicorn
    app, engine = build_core_floor(os.environ["CHATAPP_SQLALCHEMY_DATABASE_URI"])
