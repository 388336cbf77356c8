"""Generate one reply: short transactions around a bot call that holds no connection."""

from __future__ import annotations

import logging
import time

from flask import Flask

from chatapp.chat import services
from chatapp.chat.bots import BotError, bot_from_config
from chatapp.db import unit_of_work

log = logging.getLogger(__name__)


def generate_reply(app: Flask, reply_id: int) -> str:
    """Run the bot for a pending reply and store its text; returns the final status."""
    with unit_of_work(app, write=False):
        claimed = services.reply_history(reply_id)
    if claimed is None:
        return "skipped"
    attempt, history = claimed
    # From here until the next unit_of_work, no session and no connection is held.
    interval = app.config["REPLY_FLUSH_INTERVAL"]
    buffer: list[str] = []
    last_flush = time.monotonic()
    try:
        bot = bot_from_config(app.config)
        for chunk in bot.stream(history):
            buffer.append(chunk)
            if time.monotonic() - last_flush >= interval:
                if not _write(app, services.append_to_reply, reply_id, attempt, "".join(buffer)):
                    return "abandoned"
                buffer.clear()
                last_flush = time.monotonic()
        _write(app, services.finish_reply, reply_id, attempt, "".join(buffer))
        return "complete"
    except BotError as exc:
        _write(app, services.finish_reply, reply_id, attempt, "".join(buffer), str(exc))
        return "failed"
    except Exception:
        log.exception("reply %s failed", reply_id)
        _write(
            app, services.finish_reply, reply_id, attempt, "".join(buffer),
            "the reply failed because of an internal error; regenerate to retry",
        )
        return "failed"


def _write(app: Flask, operation, *args) -> bool:
    with unit_of_work(app):
        return operation(*args)
