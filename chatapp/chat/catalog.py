"""Which models the engine offers, and checking a conversation's choice against them.

Listing may ask the model server (cached per process, chatapp.chat.bots): callers run it
holding no transaction, before a write begins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import current_app

from chatapp import inputs
from chatapp.chat.bots import BotError, bot_from_config
from chatapp.errors import InvalidInput, ServiceBusy

log = logging.getLogger(__name__)
MODEL_MAX_LENGTH = 200  # the columns' size


@dataclass(frozen=True)
class ModelItem:
    id: str
    default: bool


def default_model(config=None) -> str:
    """The model a conversation without a choice of its own uses."""
    return bot_from_config(config or current_app.config).default_model


def list_models(config=None) -> list[ModelItem]:
    """The engine's models, the default first if the server does not list it; ServiceBusy if it cannot say."""
    bot = bot_from_config(config or current_app.config)
    try:
        ids = bot.models()
    except BotError as error:
        log.warning("could not list models: %s%s", error, f" [{error.detail}]" if error.detail else "")
        raise ServiceBusy(
            f"could not list the models: {error}; the default model ({bot.default_model}) can still be used",
            code="models_unavailable",
        ) from None
    if bot.default_model not in ids:
        ids = [bot.default_model, *ids]
    return [ModelItem(model_id, model_id == bot.default_model) for model_id in ids]


def models_at_hand(current: str | None = None, config=None) -> list[ModelItem]:
    """The models a page can offer without waiting for the model server: the engine's list
    if it is fixed (echo) or cached, else the default and ``current``; the page's script
    fetches the full list (GET /api/v1/models)."""
    bot = bot_from_config(config or current_app.config)
    cached = getattr(bot, "cached_models", None)
    ids = list(bot.models() if cached is None else (cached() or []))
    for model_id in (current, bot.default_model):
        if model_id and model_id not in ids:
            ids.insert(0, model_id)
    if bot.default_model in ids:  # the default first
        ids.remove(bot.default_model)
        ids.insert(0, bot.default_model)
    return [ModelItem(model_id, model_id == bot.default_model) for model_id in ids]


def check_model(model: object) -> str | None:
    """A conversation's model choice: None or "" for the default; else one the engine lists
    (InvalidInput naming those it does). The default needs no listing, so it works while
    the model server cannot list its models."""
    if model is None or model == "":
        return None
    if not isinstance(model, str) or len(model) > MODEL_MAX_LENGTH:
        raise InvalidInput(f"model must be a model id of at most {MODEL_MAX_LENGTH} characters", field="model")
    if model == default_model():
        return model
    known = [item.id for item in list_models()]
    if model not in known:
        shown = ", ".join(known[:20]) + (", …" if len(known) > 20 else "")
        raise InvalidInput(f"model {model!r} is not offered here; choose one of: {shown}", field="model")
    return model


def check_system_prompt(system_prompt: object) -> str | None:
    """A conversation's system prompt: None or blank for none (the server's default applies)."""
    if system_prompt is None:
        return None
    problem = inputs.system_prompt_problem(system_prompt)
    if problem or not isinstance(system_prompt, str):
        raise InvalidInput(f"system_prompt {problem}", field="system_prompt")
    return system_prompt if system_prompt.strip() else None
