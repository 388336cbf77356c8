"""The messages page, the hottest response, encoded without a per-message dict detour.

``json_response({"items": [message_json(row) ...], ...})`` builds each message's dict in
MessageOut's key order, reads every column by name (a Python-level lookup on a Row),
each enum's value through its descriptor, and then has Flask's JSON provider sort every
dict's keys again. Here each row is unpacked as the tuple it is, its dict is built with
its keys already in the sorted order the provider writes, and one prebuilt encoder writes
it with the provider's separators: the same bytes (tests/api/test_fast_paths.py holds
them equal to flask-smorest's marshmallow output), at half the cost. An app whose JSON
provider is configured otherwise (unsorted keys, non-ASCII output, indented for debug)
gets json_response's path, which follows its provider whatever it is.
"""

from __future__ import annotations

import json

from flask import Flask, Response, current_app
from flask.json.provider import DefaultJSONProvider

from chatapp.api.schemas import json_response, message_json

# What DefaultJSONProvider.response writes with its default settings: sorted keys, ASCII,
# compact separators (indent only in debug or with compact=False), then a newline.
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), sort_keys=False)


def _provider_is_default(app: Flask) -> bool:
    provider = app.json
    return (
        type(provider) is DefaultJSONProvider
        and provider.sort_keys is True
        and provider.ensure_ascii is True
        and not ((provider.compact is None and app.debug) or provider.compact is False)
    )


def message_page_response(rows, next_cursor: str | None) -> Response:
    """json_response({"items": [message_json(row) for row in rows], "next_cursor": ...}).

    ``rows``: the columns chatapp.chat.services.list_messages selects, in its order
    (id, conversation_id, role, content, status, error, created_at, updated_at, model).
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if not _provider_is_default(app):
        return json_response({"items": [message_json(row) for row in rows], "next_cursor": next_cursor})
    items = [
        # Keys in sorted order: what the provider's sort_keys would write.
        {
            "content": content,
            "conversation_id": conversation_id,
            "created_at": created_at.isoformat(),
            "error": error,
            "id": id_,
            "model": model,
            "role": role._value_,
            "status": status._value_,
            "updated_at": updated_at.isoformat(),
        }
        for id_, conversation_id, role, content, status, error, created_at, updated_at, model in rows
    ]
    body = _ENCODER.encode({"items": items, "next_cursor": next_cursor})
    return app.response_class(f"{body}\n", mimetype=app.json.mimetype)
