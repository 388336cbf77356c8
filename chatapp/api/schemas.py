"""Request and response schemas: they validate requests and generate the OpenAPI document."""

import operator
from collections.abc import Callable
from typing import cast

from flask import Response, current_app
from marshmallow import Schema, ValidationError, fields, validate

from chatapp import inputs
from chatapp.chat.services import CURSOR_PATTERN
from chatapp.config import LOGIN_PASSWORD_MAX_LENGTH, LOGIN_USERNAME_MAX_LENGTH, USERNAME_CHARACTERS, Defaults

# Text the database can store: PostgreSQL refuses NUL characters. Titles and messages also
# need a visible character, as the services check (they strip, then refuse empty text).
# Checked with plain string operations, never a regular expression: marshmallow runs every
# validator (the Length check does not stop the others) on bodies of up to 1 MB, and the
# obvious pattern, ^[^\0]*[^\s\0][^\0]*$, backtracks quadratically on text with a NUL
# (minutes for a 1 MB message, with the worker's GIL held throughout).
# The same rules as JSON Schema patterns for the OpenAPI document, written so that no two
# quantifiers can take the same character: a client that applies them runs in linear time.
NO_NUL_PATTERN = r"^[^\u0000]*$"
# Whitespace spelled out as Python's str.isspace() has it: a JSON Schema (ECMA) \s differs
# (it lacks U+001C-U+001F and U+0085, and has U+FEFF), so a client or a fuzzer reading it
# would disagree with the server about text such as "\u0085".
_WHITESPACE = r"\t-\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
VISIBLE_TEXT_PATTERN = f"^[{_WHITESPACE}]*[^{_WHITESPACE}\\u0000][^\\u0000]*$"


def no_nul(value: str) -> None:
    """Refuse text with a NUL character."""
    Rule(inputs.nul_problem)(value)


def visible_text(value: str) -> None:
    """Refuse text with a NUL character or with nothing but whitespace (as titles and messages are)."""
    Rule(inputs.visible_problem)(value)


class Rule:
    """A marshmallow validator checking a value against one of chatapp.inputs' rules, with the
    limits of the app handling the request (not those at import time)."""

    def __init__(self, problem):
        self.problem = problem

    def __call__(self, value) -> None:
        problem = self.problem(value)
        if problem:
            raise ValidationError(problem)


def limits(low: int, high: int) -> dict:
    """minLength and maxLength for the OpenAPI document: the defaults (a server may set others)."""
    return {"minLength": low, "maxLength": high}


class Credentials(Schema):
    username = fields.String(
        required=True,
        validate=Rule(inputs.username_problem),
        metadata={
            "example": "alice",
            "pattern": f"^[{USERNAME_CHARACTERS}]{{{Defaults.USERNAME_MIN_LENGTH},{Defaults.USERNAME_MAX_LENGTH}}}$",
        },
    )
    password = fields.String(
        required=True,
        load_only=True,
        validate=Rule(inputs.password_problem),
        metadata=limits(Defaults.PASSWORD_MIN_LENGTH, Defaults.PASSWORD_MAX_LENGTH),
    )


class Registration(Schema):
    """Credentials for a new account: the rules are Credentials', checked in the view with
    whether the name is taken, so that every problem is reported at once (error.fields)."""

    username = fields.String(required=True, metadata=Credentials._declared_fields["username"].metadata)
    password = fields.String(required=True, load_only=True, metadata=Credentials._declared_fields["password"].metadata)


class TokenRequest(Schema):
    username = fields.String(
        required=True,
        validate=[validate.Length(1, LOGIN_USERNAME_MAX_LENGTH), no_nul],
        metadata={"pattern": NO_NUL_PATTERN},
    )
    password = fields.String(required=True, load_only=True, validate=validate.Length(1, LOGIN_PASSWORD_MAX_LENGTH))
    name = fields.String(
        load_default="api",
        validate=Rule(inputs.token_name_problem),
        metadata={**limits(0, Defaults.TOKEN_NAME_MAX_LENGTH), "pattern": NO_NUL_PATTERN},
    )


class PasswordChange(Schema):
    # No NUL in any password checked or set here: no login form can send one.
    current_password = fields.String(
        required=True,
        load_only=True,
        validate=[validate.Length(1, LOGIN_PASSWORD_MAX_LENGTH), no_nul],
        metadata={"pattern": NO_NUL_PATTERN},
    )
    new_password = fields.String(
        required=True,
        load_only=True,
        validate=[Rule(inputs.password_problem), no_nul],
        metadata={**limits(Defaults.PASSWORD_MIN_LENGTH, Defaults.PASSWORD_MAX_LENGTH), "pattern": NO_NUL_PATTERN},
    )
    revoke_tokens = fields.Boolean(
        load_default=False,
        metadata={"description": "Also revoke every API token of the account (this request's token too)."},
    )


class PasswordChanged(Schema):
    login_sessions_ended = fields.Integer(
        required=True, metadata={"description": "Browsers logged out (all but the one that asked)."}
    )
    tokens_revoked = fields.Boolean(required=True)


class AccountDeletion(Schema):
    password = fields.String(
        required=True,
        load_only=True,
        validate=[validate.Length(1, LOGIN_PASSWORD_MAX_LENGTH), no_nul],
        metadata={"description": "The account's current password, to confirm.", "pattern": NO_NUL_PATTERN},
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
    cursor = fields.String(
        load_default=None,
        validate=validate.Length(1, 200),
        metadata={
            "pattern": CURSOR_PATTERN,
            "description": "The next_cursor of the previous page, as it was given (URL-safe base64, "
            "no padding); a value that is not one is refused with 422.",
        },
    )


TITLE_DOC = {**limits(1, Defaults.TITLE_MAX_LENGTH), "pattern": VISIBLE_TEXT_PATTERN}


MODEL_DOC = {
    "maxLength": 200,
    "description": "A model id from GET /models; empty for the server's default. "
    "One the engine does not offer is refused with 422 naming those it does.",
}
SYSTEM_PROMPT_DOC = {
    **limits(0, Defaults.SYSTEM_PROMPT_MAX_LENGTH),
    "pattern": NO_NUL_PATTERN,
    "description": "Sent to the model before the history, and always kept in it; blank for the server's default.",
}


class ConversationIn(Schema):
    title = fields.String(validate=Rule(inputs.title_problem), metadata=TITLE_DOC)
    model = fields.String(validate=validate.Length(0, 200), metadata=MODEL_DOC)
    system_prompt = fields.String(validate=Rule(inputs.system_prompt_problem), metadata=SYSTEM_PROMPT_DOC)


class ConversationPatch(Schema):
    # Each optional, at least one (the document's minProperties): only those sent change.
    title = fields.String(validate=Rule(inputs.title_problem), metadata=TITLE_DOC)
    model = fields.String(validate=validate.Length(0, 200), metadata=MODEL_DOC)
    system_prompt = fields.String(validate=Rule(inputs.system_prompt_problem), metadata=SYSTEM_PROMPT_DOC)


class ConversationOut(Schema):
    id = fields.Integer(required=True)
    title = fields.String(required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)
    model = fields.String(required=True, allow_none=True, metadata={"description": "null: the server's default"})
    system_prompt = fields.String(required=True, allow_none=True)


class ModelOut(Schema):
    id = fields.String(required=True)
    default = fields.Boolean(required=True, metadata={"description": "The model of conversations that choose none."})


class ModelList(Schema):
    items = fields.List(fields.Nested(ModelOut), required=True)


class ConversationPage(Schema):
    items = fields.List(fields.Nested(ConversationOut), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class MessageIn(Schema):
    content = fields.String(
        required=True,
        validate=Rule(inputs.content_problem),
        metadata={**limits(1, Defaults.MESSAGE_MAX_LENGTH), "pattern": VISIBLE_TEXT_PATTERN},
    )


class MessageOut(Schema):
    id = fields.Integer(required=True)
    conversation_id = fields.Integer(required=True)
    parent_id = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "The message this one follows in its branch; null for a first message."},
    )
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
    model = fields.String(
        required=True, allow_none=True, metadata={"description": "A reply's model (null for your messages)."}
    )


class SiblingsOut(Schema):
    index = fields.Integer(required=True, metadata={"description": "This version's place, from 1, oldest first."})
    count = fields.Integer(required=True, metadata={"description": "Versions beside each other (same parent)."})
    previous_id = fields.Integer(required=True, allow_none=True)
    next_id = fields.Integer(required=True, allow_none=True)


class BranchMessageOut(MessageOut):
    siblings = fields.Nested(
        SiblingsOut,
        required=True,
        metadata={"description": "The versions of this message: edits of a user message, regenerated replies."},
    )


class MessagePage(Schema):
    items = fields.List(fields.Nested(BranchMessageOut), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class PostedMessage(Schema):
    message = fields.Nested(BranchMessageOut, required=True)
    reply = fields.Nested(BranchMessageOut, required=True)


class BranchIn(Schema):
    message_id = fields.Integer(
        required=True,
        strict=True,
        validate=validate.Range(1, 2**31 - 1),
        metadata={"description": "Any message of the conversation: the branch through it, down to its newest leaf."},
    )


class BranchOut(Schema):
    current_leaf_id = fields.Integer(required=True)
    items = fields.List(
        fields.Nested(BranchMessageOut),
        required=True,
        metadata={"description": "The first page of the new current branch, oldest first."},
    )
    next_cursor = fields.String(required=True, allow_none=True)


class SiblingList(Schema):
    items = fields.List(fields.Nested(BranchMessageOut), required=True)


class ErrorDetail(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    field_problems = fields.Dict(
        data_key="fields",
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={
            "description": "Every field's problems, by field name, when a registration has more "
            "than one (the message names the first)."
        },
    )


class ErrorOut(Schema):
    error = fields.Nested(ErrorDetail, required=True)


class Status(Schema):
    status = fields.String(required=True)


# --- hot responses: the schemas' shape, dumped without marshmallow's machinery ------------------
# Marshmallow's per-field machinery was a fifth of a messages-list request. plain_dump() reads
# a flat schema's fields once and returns a function that gives exactly what the schema's
# dump() gives, in a fraction of the time, so the shape is defined in one place: the schema.
# Views keep @blp.response(..., <Schema>) for the OpenAPI document and return a Response,
# which flask-smorest passes through.


def plain_dump(schema_class: type[Schema]) -> Callable[[object], dict]:
    """schema_class().dump(obj) for a flat schema, as a plain function (for an object or a row).

    It knows the field types the hot schemas use; any other is refused here, at import,
    rather than dumped differently.
    """
    getters: list[tuple[str, Callable[[object], object]]] = []
    for name, field in schema_class().dump_fields.items():
        attribute = field.attribute or name
        kind = type(field)
        if isinstance(field, fields.Function) and kind is fields.Function and field.serialize_func:
            getter = field.serialize_func
        elif isinstance(field, fields.DateTime) and kind is fields.DateTime and field.format in (None, "iso"):
            getter = _isoformat_of(attribute)
        elif kind in (fields.Integer, fields.String) and not getattr(field, "as_string", False):
            getter = operator.attrgetter(attribute)
        elif isinstance(field, fields.Nested) and kind is fields.Nested and field.nested is SiblingsOut:
            # Already plain data (chatapp.chat.services.sibling_info), dumped as it is.
            getter = operator.attrgetter(attribute)
        else:
            raise TypeError(f"{schema_class.__name__}.{name}: plain_dump does not know {kind.__name__} fields")
        getters.append((field.data_key or name, getter))

    def dump(obj: object) -> dict:
        return {key: get(obj) for key, get in getters}

    dump.__doc__ = f"{schema_class.__name__}().dump(obj), for an object or a row with its columns."
    return dump


def _isoformat_of(attribute: str) -> Callable[[object], str | None]:
    read = operator.attrgetter(attribute)

    def isoformat(obj: object) -> str | None:
        value = read(obj)
        return None if value is None else value.isoformat()

    return isoformat


conversation_json = plain_dump(ConversationOut)
message_json = plain_dump(MessageOut)
branch_message_json = plain_dump(BranchMessageOut)


def json_response(payload, status: int = 200) -> Response:
    """The response flask-smorest builds from a dumped payload: same JSON provider, same bytes."""
    # Typed as werkzeug's sans-IO response; the app's response_class at run time.
    response = cast(Response, current_app.json.response(payload))
    response.status_code = status
    return response
