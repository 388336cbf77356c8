"""The JSON API under /api/v1, documented by flask-smorest from the schemas that validate it."""

from __future__ import annotations

from flask import Flask

from chatapp.api.schemas import ErrorOut
from chatapp.extensions import api, csrf


def init_app(app: Flask) -> None:
    from chatapp.api import conversations, messages, models, users

    app.config.setdefault("API_TITLE", "chatapp API")
    app.config.setdefault("API_VERSION", "v1")
    app.config.setdefault("OPENAPI_VERSION", "3.0.3")
    app.config.setdefault("OPENAPI_URL_PREFIX", "/api/v1")
    app.config.setdefault("OPENAPI_JSON_PATH", "openapi.json")
    # The error shape the OpenAPI document gives; chatapp.errors.handlers answers in it.
    # (flask-smorest's own HTTPException handler, registered by init_app, is replaced by
    # chatapp's, registered after it by create_app.)
    api.ERROR_SCHEMA = ErrorOut
    api.init_app(app)
    api.spec.components.security_scheme(
        "bearer", {"type": "http", "scheme": "bearer", "description": "Token from POST /api/v1/tokens"}
    )
    for blueprint in (users.blp, conversations.blp, messages.blp, models.blp):
        # Token requests carry no cookie to forge; cookie requests are checked in require_user.
        csrf.exempt(blueprint)
        api.register_blueprint(blueprint, url_prefix="/api/v1")
    _document_the_models(app)


def _document_the_models(app: Flask) -> None:
    """What the schemas cannot say: a PATCH changes something, and the models when the
    engine's list is fixed (echo); an
    OpenAI-compatible server's list changes, and GET /models gives it."""
    from chatapp.chat.bots import BotError, EchoBot, bot_from_config

    # A PATCH changes at least one field (the view refuses {} with 422).
    api.spec.components.schemas["ConversationPatch"]["minProperties"] = 1
    try:
        bot = bot_from_config(app.config)
    except BotError:  # an unknown engine: each reply says so, as before
        return
    if not isinstance(bot, EchoBot):
        return
    for name in ("ConversationIn", "ConversationPatch"):
        field = api.spec.components.schemas[name]["properties"]["model"]
        field["enum"] = [*bot.models(), ""]
