"""Request bodies the app can read: one strict JSON decoder for the API and for Flask.

Every JSON body, whether the API's arguments (webargs) or ``request.get_json()``, is decoded
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
from typing import Any

from flask import Flask
from flask.json.provider import DefaultJSONProvider
from webargs import core
from webargs.flaskparser import FlaskParser, abort, is_json_request

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
            raise InvalidJSON(f"the body is not UTF-8 text (byte {error.start} cannot start or continue a character)") from None
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
            return decode_json(data)
        except InvalidJSON as error:
            abort(400, exc=error, messages={"json": [f"the body is not valid JSON: {error}"]})


def init_app(app: Flask) -> None:
    app.json = JSONProvider(app)
