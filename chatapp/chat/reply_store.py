"""The reply pipeline's database work: short units of work that ride out an outage.

A reply is generated away from any request, so nobody is there to retry it: if its
writes gave up at the first failed connection, a database restart mid-reply would
leave it "streaming" until its lease expired and another run started it over. Each read or write here is retried
with backoff for REPLY_WRITE_RETRY_SECONDS, sleeping with no session and no
connection held. Retrying a write is only safe if it cannot apply twice: a commit
that failed in flight may or may not have landed, so before writing again the
writer checks whether the text it was storing is already there.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

from flask import Flask

from chatapp.chat import conversation_settings, leases, services
from chatapp.chat.bots import bot_from_config
from chatapp.chat.live_replies import LiveReply
from chatapp.chat.reply_notices import get_reply_notices
from chatapp.db import is_transient, unit_of_work

log = logging.getLogger(__name__)
T = TypeVar("T")
FIRST_DELAY = 0.1
# Short enough that a reply resumes within about a second of the database returning.
MAX_DELAY = 1.0


class DatabaseUnavailable(Exception):
    """The database stayed unreachable for longer than REPLY_WRITE_RETRY_SECONDS."""


def retry_transient(app: Flask, work: Callable[[], T], what: str) -> T:
    """``work()``, run again after a transient database error until the time budget is spent."""
    deadline = time.monotonic() + float(app.config["REPLY_WRITE_RETRY_SECONDS"])
    delay = FIRST_DELAY
    while True:
        try:
            return work()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise DatabaseUnavailable(f"{what}: {exc}") from exc
            log.warning("%s: database unavailable (%s); retrying in %.1f s", what, type(exc).__name__, delay)
        # The failed unit of work has ended: nothing is held while we wait.
        time.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)


def claim_reply(
    app: Flask, reply_id: int, owner: str
) -> tuple[int, list[dict], conversation_settings.ReplySettings] | None:
    """Take the reply's lease and read what the bot needs, in one short unit of work:
    (attempt, history, its conversation's settings), or None if the reply is not there to
    claim. The claim records the model the run uses on the reply."""
    config = app.config

    def claim():
        with unit_of_work(app):
            bot = bot_from_config(config)
            # Two statements: the claim, which returns the conversation's settings too, and
            # the history (the claim has just made the reply pending: no need to look again).
            claimed = leases.claim_run(
                reply_id,
                owner,
                float(config["REPLY_LEASE_SECONDS"]),
                int(config["REPLY_MAX_RUNS"]),
                default_model=bot.default_model,
            )
            if claimed is None:
                return None
            settings = conversation_settings.from_claim(claimed, bot.default_model)
            # The system prompt is always sent: it takes its share of the history's budget.
            prompt = settings.system_prompt
            if prompt is None:
                prompt = getattr(bot, "system_prompt", "") or ""
            budget = max(0, int(config["BOT_HISTORY_MAX_CHARS"]) - len(prompt))
            return claimed.attempt, services.history_before(reply_id, budget), settings

    return retry_transient(app, claim, f"reply {reply_id}")


# What a database refuses in text, whichever bot produced it: NUL (PostgreSQL) and lone
# UTF-16 surrogates (not encodable as UTF-8). A character class: no backtracking.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """Bot output made storable: NUL dropped, lone surrogates replaced by U+FFFD."""
    return _UNSTORABLE.sub(lambda match: "" if match.group() == "\x00" else "\ufffd", text)


class ReplyWriter:
    """Appends one attempt's text and finishes it, each write applied exactly once."""

    def __init__(self, app: Flask, reply_id: int, attempt: int, owner: str, live: LiveReply | None = None):
        self.app = app
        self.reply_id = reply_id
        self.attempt = attempt
        self.owner = owner
        self.live = live
        # Characters of this attempt that this writer has committed so far.
        self.stored = 0

    def append(self, text: str) -> bool:
        """Store more text; False if the reply was restarted, stopped, deleted or taken over."""
        return self._write(text, final=False, error=None)

    def finish(self, text: str, error: str | None = None) -> bool:
        """Store the last text and end the reply complete, or failed with ``error``."""
        return self._write(text, final=True, error=error)

    def _write(self, text: str, *, final: bool, error: str | None) -> bool:
        text = storable_text(text)
        error = storable_text(error) if error else error
        uncertain = False  # a commit failed in flight: it may have landed

        def write_once() -> bool:
            nonlocal uncertain
            committing = False
            try:
                with unit_of_work(self.app):
                    landed = self._landed(text, final, error) if uncertain else None
                    if landed is not None:
                        return landed
                    if final:
                        done = services.finish_reply(self.reply_id, self.attempt, text, error, owner=self.owner)
                    else:
                        done = services.append_to_reply(self.reply_id, self.attempt, text, owner=self.owner)
                    committing = True  # the block ends here: unit_of_work commits
                return done
            except Exception:
                uncertain = uncertain or committing
                raise

        done = retry_transient(self.app, write_once, f"reply {self.reply_id}")
        if done:
            self.stored += len(text)
            if self.live is not None:
                # Only after the commit landed: streams never show text the database lacks.
                self.live.stored(self.attempt, text, final=final, error=error)
            notices = get_reply_notices(self.app)
            if notices is not None:
                # Streams in other processes (or hosts) take the new text from the notice.
                status = ("failed" if error else "complete") if final else "streaming"
                notices.publish(self.reply_id, self.attempt, self.stored, status, text=text, error=error)
        return done

    def _landed(self, text: str, final: bool, error: str | None) -> bool | None:
        """After an uncertain commit: True if it landed, False if the reply moved on, None to write."""
        progress = services.read_reply_progress(self.reply_id, self.stored)
        if progress is None or progress["attempt"] != self.attempt:
            return False  # deleted or regenerated: nothing more to write either way
        if progress["delta"] != text:
            return None  # only this writer appends to this attempt: the commit did not land
        if not final:
            return True
        wanted = "failed" if error else "complete"
        return True if progress["status"] == wanted and progress["error"] == error else None
