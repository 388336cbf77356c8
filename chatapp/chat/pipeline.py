"""Generate one reply: short transactions around a bot call that holds no connection.

The reads and writes (chatapp.chat.reply_store) retry through a database outage, so a
reply ends complete or failed once the database is back, rather than stuck streaming.
"""

from __future__ import annotations

import logging
import time

from flask import Flask

from chatapp.chat.bots import BotError, bot_from_config
from chatapp.chat.live_replies import LiveReply
from chatapp.chat.reply_store import DatabaseUnavailable, ReplyWriter, read_history
from chatapp.ops import metrics

log = logging.getLogger(__name__)


@metrics.reply_job  # labels its connections "job:reply", counts final statuses
def generate_reply(app: Flask, reply_id: int, live: LiveReply | None = None) -> str:
    """Run the bot for a pending reply and store its text; returns the final status.

    ``live``, when the reply runs in the process that serves its streams, is told what
    each write stored (chatapp.chat.live_replies); a job queue's worker passes nothing.
    """
    try:
        claimed = read_history(app, reply_id)
        if claimed is None:
            return "skipped"
        attempt, history = claimed
        if live is not None:
            live.claimed(attempt)
        return _run_bot(app, ReplyWriter(app, reply_id, attempt, live), history)
    except DatabaseUnavailable:
        # Its last progress is stored; the reaper fails it after REPLY_STALE_AFTER.
        log.error("reply %s: the database stayed unavailable; leaving it to the reaper",
                  reply_id, exc_info=True)
        return "lost"


def _run_bot(app: Flask, writer: ReplyWriter, history: list[dict]) -> str:
    # From here on no session and no connection is held, except inside the writer's
    # short units of work.
    interval = app.config["REPLY_FLUSH_INTERVAL"]
    buffer: list[str] = []
    last_flush = time.monotonic()
    try:
        bot = bot_from_config(app.config)
        for chunk in metrics.timed_bot_stream(bot.stream(history)):
            buffer.append(chunk)
            if time.monotonic() - last_flush >= interval:
                if not writer.append("".join(buffer)):
                    return "abandoned"
                buffer.clear()
                last_flush = time.monotonic()
        writer.finish("".join(buffer))
        return "complete"
    except DatabaseUnavailable:
        raise
    except BotError as exc:
        # The user sees the general message; the operator's log gets what the model server
        # said and where it is (credentials masked), with the reply it happened to.
        log.warning(
            "reply %s (attempt %s) failed: %s%s", writer.reply_id, writer.attempt, exc,
            f" [{exc.detail}]" if exc.detail else "",
        )
        writer.finish("".join(buffer), str(exc))
        return "failed"
    except Exception:
        log.exception("reply %s failed", writer.reply_id)
        writer.finish(
            "".join(buffer), "the reply failed because of an internal error; regenerate to retry"
        )
        return "failed"
