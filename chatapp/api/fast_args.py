"""The page query (``?limit=&cursor=``) of the list views, read without marshmallow when it is plain.

webargs loads a query through a marshmallow schema: a MultiDict proxy, the schema's
load with its field machinery and validators, for two optional parameters. When the
query string holds nothing but those parameters, each once, with a limit of ASCII digits
and a cursor of the allowed length, the result is known in advance; this parser returns
it directly. Anything else (a missing or bad value, an unknown or repeated parameter)
goes through webargs exactly as before, so its errors and its handling of extra
parameters are webargs' own.

The bounds and defaults are read from the schema's own fields and validators when this
module is imported; a PageQuery that has changed shape (another field, another kind of
validator) simply turns the shortcut off.
"""

from __future__ import annotations

from flask import request
from marshmallow import fields, missing, validate

from chatapp.api.schemas import PageQuery
from chatapp.inputs import ArgumentsParser


def _bounds(field, kind):
    """(minimum, maximum) from the field's one validator of ``kind``, or None."""
    validators = list(field.validators)
    if len(validators) != 1 or type(validators[0]) is not kind:
        return None
    v = validators[0]
    if kind is validate.Range:
        if not (v.min_inclusive and v.max_inclusive) or v.min is None or v.max is None:
            return None
        return v.min, v.max
    if v.equal is not None or v.min is None or v.max is None:
        return None
    return v.min, v.max


def _page_query_shape():
    """PageQuery's (limit default, limit bounds, cursor default, cursor bounds), if it is the shape known here."""
    schema = PageQuery()
    if set(schema.fields) != {"limit", "cursor"}:
        return None
    limit, cursor = schema.fields["limit"], schema.fields["cursor"]
    if (
        type(limit) is not fields.Integer
        or type(cursor) is not fields.String
        or limit.data_key not in (None, "limit")
        or cursor.data_key not in (None, "cursor")
        or limit.strict
        or limit.load_default is missing
        or cursor.load_default is missing
    ):
        return None
    limit_bounds, cursor_bounds = _bounds(limit, validate.Range), _bounds(cursor, validate.Length)
    if limit_bounds is None or cursor_bounds is None or limit_bounds[0] < 0:
        return None
    if schema._hooks and any(schema._hooks.values()):  # pre_load/post_load/validates_schema
        return None
    return limit.load_default, limit_bounds, cursor.load_default, cursor_bounds


_SHAPE = _page_query_shape()


def _plain_page_query(req):
    """{"limit": ..., "cursor": ...} as PageQuery would load it, or None to let webargs decide."""
    limit_default, (low, high), cursor_default, (shortest, longest) = _SHAPE
    args = req.args
    limit, cursor = limit_default, cursor_default
    for key, values in args.lists():
        if len(values) != 1:
            return None
        value = values[0]
        if key == "limit":
            # ASCII digits only (int() would also take signs, spaces, underscores and
            # other scripts' digits: those go to webargs), and short.
            if not (value.isascii() and value.isdigit()) or len(value) > len(str(high)):
                return None
            limit = int(value)
            if not low <= limit <= high:
                return None
        elif key == "cursor":
            if not shortest <= len(value) <= longest:
                return None
            cursor = value
        else:
            return None
    return {"limit": limit, "cursor": cursor}


class PageQueryParser(ArgumentsParser):
    """chatapp's arguments parser, answering a plain page query without loading the schema."""

    def parse(self, argmap, req=None, *, location=None, **kwargs):
        if _SHAPE is not None and location == "query" and type(argmap) is PageQuery and kwargs.get("validate") is None:
            parsed = _plain_page_query(req if req is not None else request)
            if parsed is not None:
                return parsed
        return super().parse(argmap, req, location=location, **kwargs)


PAGE_QUERY_PARSER = PageQueryParser()
