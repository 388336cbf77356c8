"""A textbook Flask-SQLAlchemy chatbot, the baseline chatapp is compared against.

Written the way the Flask-SQLAlchemy 3.1 documentation and most tutorials write one:
``db = SQLAlchemy(app)``, models on ``db.Model``, the request-scoped ``db.session``,
``db.first_or_404``, ``jsonify``, Flask-SQLAlchemy's default engine options (so
SQLAlchemy's default pool: 5 connections + 10 overflow, 30 s pool timeout), and the
bot's reply generated inside the POST request while the request's session holds its
connection. It maps chatapp's own tables (created by ``flask --app chatapp init-db``),
authenticates the same Bearer tokens and serves the same URLs, so the same load can
be pointed at either app. The bot is chatapp's EchoBot with the same delay setting
(CHATAPP_BOT_ECHO_DELAY), so both apps wait for exactly the same "model".

    gunicorn -c gunicorn.conf.py bench.textbook_app:app   (CHATAPP_SQLALCHEMY_DATABASE_URI=...)
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime

from flask import Flask, abort, jsonify, request
from flask_sqlalchemy import SQLAlchemy

from chatapp.chat.bots import EchoBot

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["CHATAPP_SQLALCHEMY_DATABASE_URI"]
db = SQLAlchemy(app)
bot = EchoBot(delay=float(json.loads(os.environ.get("CHATAPP_BOT_ECHO_DELAY", "0"))))


def now():
    return datetime.now(UTC)


class User(db.Model):
    __tablename__ = "users"
    id = db.Column(db.Integer, primary_key=True)
    username = db.Column(db.String(40), unique=True, nullable=False)
    password_hash = db.Column(db.String(255), nullable=False)
    created_at = db.Column(db.DateTime(timezone=True), default=now, nullable=False)


class ApiToken(db.Model):
    __tablename__ = "api_tokens"
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("users.id"), nullable=False)
    token_hash = db.Column(db.String(64), unique=True, nullable=False)
    prefix = db.Column(db.String(16), nullable=False)
    name = db.Column(db.String(100), nullable=False, default="")
    created_at = db.Column(db.DateTime(timezone=True), default=now, nullable=False)
    last_used_at = db.Column(db.DateTime(timezone=True))
    revoked_at = db.Column(db.DateTime(timezone=True))
    user = db.relationship("User")


class Conversation(db.Model):
    __tablename__ = "conversations"
    id = db.Column(db.Integer, primary_key=True)
    owner_id = db.Column(db.Integer, db.ForeignKey("users.id"), nullable=False)
    title = db.Column(db.String(200), nullable=False)
    created_at = db.Column(db.DateTime(timezone=True), default=now, nullable=False)
    updated_at = db.Column(db.DateTime(timezone=True), default=now, nullable=False)


class Message(db.Model):
    __tablename__ = "messages"
    id = db.Column(db.Integer, primary_key=True)
    conversation_id = db.Column(db.Integer, db.ForeignKey("conversations.id"), nullable=False)
    role = db.Column(db.String(16), nullable=False)
    content = db.Column(db.Text, nullable=False, default="")
    status = db.Column(db.String(16), nullable=False, default="complete")
    error = db.Column(db.Text)
    attempt = db.Column(db.Integer, nullable=False, default=0)
    created_at = db.Column(db.DateTime(timezone=True), default=now, nullable=False)
    updated_at = db.Column(db.DateTime(timezone=True), default=now, nullable=False)

    def to_dict(self):
        return {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "role": self.role,
            "content": self.content,
            "status": self.status,
            "error": self.error,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


def _iso(value: datetime) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def current_user() -> User:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        abort(401)
    token_hash = hashlib.sha256(header[7:].encode()).hexdigest()
    token = db.session.execute(
        db.select(ApiToken).filter_by(token_hash=token_hash, revoked_at=None)
    ).scalar_one_or_none()
    if token is None:
        abort(401)
    return token.user


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.get("/api/v1/conversations/<int:conversation_id>/messages")
def list_messages(conversation_id):
    user = current_user()
    conversation = db.first_or_404(db.select(Conversation).filter_by(id=conversation_id, owner_id=user.id))
    limit = min(max(request.args.get("limit", 20, type=int), 1), 100)
    messages = (
        db.session.execute(
            db.select(Message).filter_by(conversation_id=conversation.id).order_by(Message.id).limit(limit + 1)
        )
        .scalars()
        .all()
    )
    next_cursor = str(messages[limit - 1].id) if len(messages) > limit else None
    return jsonify(items=[m.to_dict() for m in messages[:limit]], next_cursor=next_cursor)


@app.post("/api/v1/conversations/<int:conversation_id>/messages")
def post_message(conversation_id):
    user = current_user()
    conversation = db.first_or_404(db.select(Conversation).filter_by(id=conversation_id, owner_id=user.id))
    content = (request.get_json(silent=True) or {}).get("content")
    if not isinstance(content, str) or not content.strip():
        abort(400)
    message = Message(conversation_id=conversation.id, role="user", content=content, status="complete")
    db.session.add(message)
    conversation.updated_at = now()
    db.session.commit()

    # The textbook part: ask the bot inside the request. The history query checks a
    # connection out again and the session keeps it (and its transaction) until the
    # commit below, for as long as the bot takes.
    history = (
        db.session.execute(
            db.select(Message).filter_by(conversation_id=conversation.id, status="complete").order_by(Message.id)
        )
        .scalars()
        .all()
    )
    text = "".join(bot.stream([{"role": m.role, "content": m.content} for m in history]))

    reply = Message(conversation_id=conversation.id, role="assistant", content=text, status="complete")
    db.session.add(reply)
    conversation.updated_at = now()
    db.session.commit()
    return jsonify(message=message.to_dict(), reply=reply.to_dict()), 201
