"""How every API blueprint starts: JSON bodies only, optional auth (transactions: chatapp.db.policy)."""

from __future__ import annotations

from flask import request
from flask_smorest import Blueprint

from chatapp.api.auth import record_token_use, require_user
from chatapp.errors import AppError
from chatapp.inputs import ArgumentsParser


class UnsupportedMediaType(AppError):
    status = 415
    code = "unsupported_media_type"


def require_json_body() -> None:
    """A body sent to the API must be JSON (webargs would otherwise read it as empty)."""
    if (
        request.method in ("POST", "PUT", "PATCH")
        and (request.content_length or request.headers.get("Transfer-Encoding"))
        and not request.is_json
    ):
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")


class ApiBlueprint(Blueprint):
    """flask-smorest's Blueprint reading JSON bodies with chatapp's strict decoder."""

    ARGUMENTS_PARSER = ArgumentsParser()


def api_blueprint(name: str, description: str, *, authenticated: bool) -> Blueprint:
    """A blueprint that takes JSON bodies and, if ``authenticated``, authenticates every request first."""
    blp = ApiBlueprint(name, f"chatapp.api.{name}", description=description)
    blp.before_request(require_json_body)
    if authenticated:
        blp.before_request(require_user)
    blp.after_request(record_token_use)
    return blp
