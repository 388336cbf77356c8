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

from chatapp.api.schemas import branch_message_json, json_response

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
    """json_response({"items": [branch_message_json(row) for row in rows], "next_cursor": ...}).

    ``rows``: chatapp.chat.services.BranchMessage rows, as list_messages gives them.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if not _provider_is_default(app):
        return json_response({"items": [branch_message_json(row) for row in rows], "next_cursor": next_cursor})
    items = [
        # Keys in sorted order: what the provider's sort_keys would write (siblings' too).
        {
            "content": row.content,
            "conversation_id": row.conversation_id,
            "created_at": row.created_at.isoformat(),
            "error": row.error,
            "id": row.id,
            "model": row.model,
            "parent_id": row.parent_id,
            "role": row.role._value_,
            "siblings": row.siblings,
            "status": row.status._value_,
            "updated_at": row.updated_at.isoformat(),
        }
        for row in rows
    ]
    body = _ENCODER.encode({"items": items, "next_cursor": next_cursor})
    return app.response_class(f"{body}\n", mimetype=app.json.mimetype)
