"""Generate one reply: claim its lease, then short transactions around a bot call that
holds no connection.

The reads and writes (chatapp.chat.reply_store) retry through a database outage. If the
outage outlasts the lease, another process takes the reply over and this run's writes
match nothing; if every process was down, the first to come back claims it again.
"""

from __future__ import annotations

import logging
import time

from flask import Flask

from chatapp.chat import leases, titles
from chatapp.chat.bots import BotError, bot_from_config
from chatapp.chat.conversation_settings import ReplySettings
from chatapp.chat.live_replies import LiveReply
from chatapp.chat.reply_store import DatabaseUnavailable, ReplyWriter, claim_reply
from chatapp.ops import metrics

log = logging.getLogger(__name__)


@metrics.reply_job  # labels its connections "job:reply", counts final statuses
def generate_reply(
    app: Flask,
    reply_id: int,
    *,
    owner: str | None = None,
    cancel=None,
    live: LiveReply | None = None,
) -> str:
    """Claim a reply in progress, run the bot and store its text; returns how the run ended.

    ``owner`` names the lease holder (default: this process); ``cancel`` (chatapp.chat.runner.Cancellation)
    stops the run and closes the bot's request; ``live``, when the reply runs in the
    process that serves its streams, is told what each write stored.
    """
    owner = owner or leases.process_owner()
    try:
        claimed = claim_reply(app, reply_id, owner)
        if claimed is None:
            return "skipped"  # finished, stopped, deleted, or another process holds it
        attempt, history, settings = claimed
        if cancel is not None:
            cancel.claimed = True
        if live is not None:
            live.claimed(attempt)
        writer = ReplyWriter(app, reply_id, attempt, owner, live)
        status = _run_bot(app, writer, history, cancel, settings)
        if status == "complete" and settings.needs_title and app.config["TITLES_ENABLED"]:
            # Only the id crosses over; the job reads and writes in its own short units of work.
            titles.get_title_jobs(app).submit(settings.conversation_id)
        return status
    except DatabaseUnavailable:
        # Its last progress is stored; when the lease expires, a live process runs it again.
        log.error(
            "reply %s: the database stayed unavailable; its lease will expire and another run will take it over",
            reply_id,
            exc_info=True,
        )
        return "lost"


def _run_bot(app: Flask, writer: ReplyWriter, history: list[dict], cancel, settings: ReplySettings) -> str:
    # From here on no session and no connection is held, except inside the writer's
    # short units of work.
    interval = app.config["REPLY_FLUSH_INTERVAL"]
    buffer: list[str] = []
    # The first text is stored (and told to the streams) at once, the rest every interval:
    # at most one write for the first chunk, one per interval, and the final one.
    last_flush = float("-inf")
    try:
        bot = bot_from_config(app.config)
        chunks = bot.stream(history, cancel, model=settings.model, system_prompt=settings.system_prompt)
        for chunk in metrics.timed_bot_stream(chunks):
            if cancel is not None and cancel.is_set():
                break
            buffer.append(chunk)
            if time.monotonic() - last_flush >= interval:
                if not writer.append("".join(buffer)):
                    return "abandoned"
                buffer.clear()
                last_flush = time.monotonic()
        if cancel is not None and cancel.is_set():
            # Stopped (the reply's status says so already) or handed over (the runner
            # releases the lease): either way this run writes nothing more.
            return "stopped" if cancel.reason == "stopped" else "handed_over"
        writer.finish("".join(buffer))
        return "complete"
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        if cancel is not None and cancel.is_set():
            # Closing the bot's connection from the keeper thread ends its read with an error.
            return "stopped" if cancel.reason == "stopped" else "handed_over"
        if isinstance(exc, BotError):
            # The user sees the general message; the operator's log gets what the model
            # server said and where it is (credentials masked), with the reply it happened to.
            log.warning(
                "reply %s (attempt %s) failed: %s%s",
                writer.reply_id,
                writer.attempt,
                exc,
                f" [{exc.detail}]" if exc.detail else "",
            )
            writer.finish("".join(buffer), str(exc))
            return "failed"
        log.exception("reply %s failed", writer.reply_id)
        writer.finish("".join(buffer), "the reply failed because of an internal error; regenerate to retry")
        return "failed"
