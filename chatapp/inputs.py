"""What the app reads from requests: one strict JSON decoder, and one set of input rules.

The rules (at the end) are what services, API schemas and web forms check text fields
against, with the limits of the app's config. The decoder:

every JSON body, whether the API's arguments (webargs) or ``request.get_json()``, is decoded
here, so a malformed one is a 400 wherever it is sent, never an exception deep in a view:

- the bytes must be UTF-8 (RFC 8259 says so; anything else is refused, not guessed);
- no lone UTF-16 surrogate in any string or key: ``"\\ud800"`` is valid JSON syntax but
  decodes to a Python str that cannot be encoded again, so the database driver, the log or
  the Markdown renderer would fail on it;
- no NaN, Infinity or -Infinity (not JSON), no number too long for int() (Python refuses
  more than 4300 digits), no nesting too deep for the parser (a RecursionError);
- no key twice in one object: parsers disagree on which copy wins.

Text that JSON can carry but a column cannot (NUL) is checked per field by the schemas,
which name the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Flask, current_app
from flask.json.provider import DefaultJSONProvider
from webargs import core
from webargs.flaskparser import FlaskParser, abort, is_json_request

from chatapp.config import USERNAME_CHARACTERS, USERNAME_CHARACTERS_RULE

# A body nested deeper than this is refused; no request the API takes nests more than one
# level, and a shallow bound keeps every later walk over the value cheap.
MAX_JSON_DEPTH = 64


class InvalidJSON(ValueError):
    """A request body that is not JSON the app can read; the message says why, for people."""


def _refuse_constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidJSON(f"the key {_shown(key)} appears twice in one object")
            seen.add(key)
    return value


def _shown(text: str) -> str:
    """A key or field name for a message: quoted, surrogates escaped, bounded."""
    return repr(text[:40] + ("..." if len(text) > 40 else "")).encode("ascii", "backslashreplace").decode()


def _is_unicode(text: str) -> bool:
    if text.isascii():  # constant time in CPython: a flag of the string
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(value: Any) -> None:
    """Refuse a lone surrogate anywhere in the value, naming where; refuse deep nesting.

    Iterative, so the walk itself cannot overflow the stack.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if not _is_unicode(item):
                place = f"at {where}" if where else "in the body"
                raise InvalidJSON(
                    f"the text {place} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is "
                    "not a character; send each character whole (a surrogate pair for one above U+FFFF)"
                )
        elif isinstance(item, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidJSON(f"the body nests more than {MAX_JSON_DEPTH} levels deep")
            if isinstance(item, dict):
                for key, child in item.items():
                    if not _is_unicode(key):
                        raise InvalidJSON(
                            "a key holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not a character"
                        )
                    stack.append((child, f"{where}.{key}" if where else _shown(key), depth + 1))
            else:
                stack.extend((child, f"{where or 'body'}[{i}]", depth + 1) for i, child in enumerate(item))


def decode_json(data: bytes | bytearray | str) -> Any:
    """The value of a JSON document, or InvalidJSON saying what is wrong with it."""
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidJSON(
                f"the body is not UTF-8 text (byte {error.start} cannot start or continue a character)"
            ) from None
    else:
        text = data
    try:
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_object)
    except InvalidJSON:
        raise
    except json.JSONDecodeError as error:
        raise InvalidJSON(f"{error.msg} (line {error.lineno}, column {error.colno})") from None
    except RecursionError:
        raise InvalidJSON(f"the body nests more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError:
        # int() refuses numbers of more than sys.get_int_max_str_digits() digits.
        raise InvalidJSON("a number in the body has too many digits") from None
    _check_text(value)
    return value


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, decoding with decode_json: request.get_json() refuses what the API refuses.

    Werkzeug turns the ValueError into a 400. Responses are encoded as before.
    """

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return decode_json(s)


class ArgumentsParser(FlaskParser):
    """webargs' Flask parser reading JSON bodies with decode_json."""

    def load_json(self, req, schema):
        if not is_json_request(req):
            return core.missing
        data = req.get_data(cache=True)
        if not data:
            # No body at all: as webargs does, the schema sees no fields (required ones then
            # say they are missing).
            return core.missing
        try:
            value = decode_json(data)
        except InvalidJSON as error:
            abort(400, exc=error, messages={"json": [f"the body is not valid JSON: {error}"]})
        if not isinstance(value, dict):
            # Every body the API reads is an object (marshmallow would say "_schema: Invalid input type.").
            kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
            kind = kinds.get(type(value), "a number")
            abort(422, messages={"json": [f"the body must be a JSON object, not {kind}"]})
        return value


def init_app(app: Flask) -> None:
    app.json = JSONProvider(app)


# --- input rules: one wording, limits read from the app's config when a value is checked ----------
#
# Services, the API's schemas and the web's forms all call these, so a limit an operator sets
# (chatapp.config.Defaults) holds everywhere at once, and every refusal reads the same: the API
# says "field 'title': must be 1-200 characters", a page "Title must be 1-200 characters.".
# Each returns None for a good value, else what is wrong, to follow the field's name.

NO_NUL_MESSAGE = "must not contain NUL characters"
VISIBLE_TEXT_MESSAGE = "must contain a visible character and no NUL characters"
_USERNAME_CHARACTERS = re.compile(f"[{USERNAME_CHARACTERS}]*")


def limit(name: str) -> int:
    return current_app.config[name]


def username_problem(value: object) -> str | None:
    low, high = limit("USERNAME_MIN_LENGTH"), limit("USERNAME_MAX_LENGTH")
    if not isinstance(value, str) or not low <= len(value) <= high or not _USERNAME_CHARACTERS.fullmatch(value):
        return f"must be {low}-{high} characters: {USERNAME_CHARACTERS_RULE}"
    return None


def password_problem(value: object) -> str | None:
    low, high = limit("PASSWORD_MIN_LENGTH"), limit("PASSWORD_MAX_LENGTH")
    if not isinstance(value, str) or not low <= len(value) <= high:
        return f"must be {low}-{high} characters"
    return None


def _text_problem(value: object, low: int, high: int, *, visible: bool) -> str | None:
    """Text of low..high characters; with ``visible``, not only whitespace. Never a NUL (no
    database column takes one). Plain string operations, never a regular expression: the
    value may be a megabyte long (see chatapp.api.schemas)."""
    if not isinstance(value, str) or not low <= len(value) <= high:
        return f"must be {low}-{high} characters"
    return visible_problem(value) if visible else nul_problem(value)


def nul_problem(value: str) -> str | None:
    return NO_NUL_MESSAGE if "\x00" in value else None


def visible_problem(value: str) -> str | None:
    """Text with something visible and no NUL. str.strip() and Python's \\s agree on what
    whitespace is: what str.isspace() says."""
    return VISIBLE_TEXT_MESSAGE if "\x00" in value or not value.strip() else None


def title_problem(value: object) -> str | None:
    return _text_problem(value, 1, limit("TITLE_MAX_LENGTH"), visible=True)


def content_problem(value: object) -> str | None:
    return _text_problem(value, 1, limit("MESSAGE_MAX_LENGTH"), visible=True)


def token_name_problem(value: object) -> str | None:
    return _text_problem(value, 0, limit("TOKEN_NAME_MAX_LENGTH"), visible=False)


def system_prompt_problem(value: object) -> str | None:
    # Empty is allowed: it clears the prompt (the server's default applies).
    return _text_problem(value, 0, limit("SYSTEM_PROMPT_MAX_LENGTH"), visible=False)
