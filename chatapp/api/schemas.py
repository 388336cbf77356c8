"""Request and response schemas: they validate requests and generate the OpenAPI document."""

from typing import cast

from flask import Response, current_app
from marshmallow import Schema, ValidationError, fields, validate

from chatapp.auth.services import USERNAME_PATTERN, USERNAME_RULE
from chatapp.chat.services import CONTENT_MAX, TITLE_MAX
from chatapp.config import Defaults

# Text the database can store: PostgreSQL refuses NUL characters. Titles and messages also
# need a visible character, as the services check (they strip, then refuse empty text).
# Checked with plain string operations, never a regular expression: marshmallow runs every
# validator (the Length check does not stop the others) on bodies of up to 1 MB, and the
# obvious pattern, ^[^\0]*[^\s\0][^\0]*$, backtracks quadratically on text with a NUL
# (minutes for a 1 MB message, with the worker's GIL held throughout).
NO_NUL_MESSAGE = "must not contain NUL characters"
VISIBLE_TEXT_MESSAGE = "must contain a visible character and no NUL characters"
# The same rules as JSON Schema patterns for the OpenAPI document, written so that no two
# quantifiers can take the same character: a client that applies them runs in linear time.
NO_NUL_PATTERN = r"^[^\u0000]*$"
VISIBLE_TEXT_PATTERN = r"^\s*[^\s\u0000][^\u0000]*$"


def no_nul(value: str) -> None:
    """Refuse text with a NUL character."""
    if "\x00" in value:
        raise ValidationError(NO_NUL_MESSAGE)


def visible_text(value: str) -> None:
    """Refuse text with a NUL character or with nothing but whitespace.

    str.strip() and Python's \\s agree on what whitespace is: what str.isspace() says.
    """
    if "\x00" in value or not value.strip():
        raise ValidationError(VISIBLE_TEXT_MESSAGE)


class Credentials(Schema):
    username = fields.String(
        required=True,
        validate=validate.Regexp(USERNAME_PATTERN.pattern + r"\Z", error=f"must be {USERNAME_RULE}"),
        metadata={"example": "alice", "pattern": "^[A-Za-z0-9_.-]{3,40}$"},
    )
    password = fields.String(
        required=True,
        load_only=True,
        validate=validate.Length(Defaults.PASSWORD_MIN_LENGTH, Defaults.PASSWORD_MAX_LENGTH),
    )


class TokenRequest(Schema):
    username = fields.String(
        required=True, validate=[validate.Length(1, 200), no_nul], metadata={"pattern": NO_NUL_PATTERN}
    )
    password = fields.String(required=True, load_only=True, validate=validate.Length(1, 1000))
    name = fields.String(
        load_default="api", validate=[validate.Length(0, 100), no_nul], metadata={"pattern": NO_NUL_PATTERN}
    )


class UserOut(Schema):
    id = fields.Integer(required=True)
    username = fields.String(required=True)
    created_at = fields.DateTime(required=True)


class TokenOut(Schema):
    token = fields.String(required=True, metadata={"description": "Shown once; store it now."})
    id = fields.Integer(required=True)
    prefix = fields.String(required=True)
    name = fields.String(required=True)
    created_at = fields.DateTime(required=True)


class LoginSessionsEnded(Schema):
    ended = fields.Integer(required=True, metadata={"description": "How many browser logins ended."})


class PageQuery(Schema):
    limit = fields.Integer(load_default=20, validate=validate.Range(1, 100))
    cursor = fields.String(load_default=None, validate=validate.Length(1, 200))


class ConversationIn(Schema):
    title = fields.String(
        validate=[validate.Length(1, TITLE_MAX), visible_text], metadata={"pattern": VISIBLE_TEXT_PATTERN}
    )


class ConversationPatch(Schema):
    title = fields.String(
        required=True,
        validate=[validate.Length(1, TITLE_MAX), visible_text],
        metadata={"pattern": VISIBLE_TEXT_PATTERN},
    )


class ConversationOut(Schema):
    id = fields.Integer(required=True)
    title = fields.String(required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


class ConversationPage(Schema):
    items = fields.List(fields.Nested(ConversationOut), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class MessageIn(Schema):
    content = fields.String(
        required=True,
        validate=[validate.Length(1, CONTENT_MAX), visible_text],
        metadata={"pattern": VISIBLE_TEXT_PATTERN},
    )


class MessageOut(Schema):
    id = fields.Integer(required=True)
    conversation_id = fields.Integer(required=True)
    role = fields.Function(lambda m: m.role.value, required=True, metadata={"enum": ["user", "assistant", "system"]})
    content = fields.String(required=True)
    status = fields.Function(
        lambda m: m.status.value,
        required=True,
        metadata={"enum": ["pending", "streaming", "complete", "failed", "stopped"]},
    )
    error = fields.String(required=True, allow_none=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


class MessagePage(Schema):
    items = fields.List(fields.Nested(MessageOut), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class PostedMessage(Schema):
    message = fields.Nested(MessageOut, required=True)
    reply = fields.Nested(MessageOut, required=True)


class ErrorDetail(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)


class ErrorOut(Schema):
    error = fields.Nested(ErrorDetail, required=True)


class Status(Schema):
    status = fields.String(required=True)


# --- hot responses, serialized without marshmallow ---------------------------------------
# Marshmallow's per-field machinery was a fifth of a messages-list request. These plain
# functions give exactly what ConversationOut and MessageOut dump (tests/api/test_fast_paths.py
# holds them equal on every backend); the views keep @blp.response(..., <Schema>) so the
# OpenAPI document is unchanged, and return a Response, which flask-smorest passes through.


def conversation_json(conversation) -> dict:
    """ConversationOut().dump(conversation), for a Conversation or a row with its columns."""
    return {
        "id": conversation.id,
        "title": conversation.title,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
    }


def message_json(message) -> dict:
    """MessageOut().dump(message), for a Message or a row with its columns."""
    return {
        "id": message.id,
        "conversation_id": message.conversation_id,
        "role": message.role.value,
        "content": message.content,
        "status": message.status.value,
        "error": message.error,
        "created_at": message.created_at.isoformat(),
        "updated_at": message.updated_at.isoformat(),
    }


def json_response(payload, status: int = 200) -> Response:
    """The response flask-smorest builds from a dumped payload: same JSON provider, same bytes."""
    # Typed as werkzeug's sans-IO response; the app's response_class at run time.
    response = cast(Response, current_app.json.response(payload))
    response.status_code = status
    return response
