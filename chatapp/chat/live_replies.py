"""Replies being generated in this process, so that its streams wait instead of polling.

The reply writer publishes each piece of text here after the commit that stored it. A
stream served by the same worker waits on that and takes the new text from memory, with
no database work, instead of reading the database every STREAM_POLL_INTERVAL. Only
committed text is published, so a stream shows exactly what a reconnect, or a stream in
another worker (which polls), reads back. Nothing here holds a session or an ORM object:
a reply's state is plain strings and ints, guarded by its own condition variable.
"""

from __future__ import annotations

import threading

from flask import Flask

EXTENSION_KEY = "chatapp.live_replies"


class LiveReply:
    """The committed state of one reply while this process generates it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._version = 0
        self._attempt: int | None = None  # known once the job has claimed the reply
        self._text = ""  # the attempt's committed text
        self._status = "pending"
        self._error: str | None = None
        self._ended = False  # the job is over (or was replaced); the state stays readable

    def snapshot(self, offset: int) -> tuple[int, dict | None]:
        """(version, progress from ``offset`` on), the progress shaped like
        ``services.read_reply_progress``; None when memory cannot answer (not claimed
        yet, or the job ended without storing a final status)."""
        with self._changed:
            known = self._attempt is not None and (not self._ended or self._status in ("complete", "failed"))
            if not known:
                return self._version, None
            return self._version, {
                "attempt": self._attempt,
                "delta": self._text[offset:],
                "status": self._status,
                "error": self._error,
            }

    @property
    def ended(self) -> bool:
        return self._ended

    def wait(self, version: int, timeout: float) -> None:
        """Block until the state changes past ``version`` or ``timeout`` seconds pass."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != version, timeout)

    def claimed(self, attempt: int) -> None:
        self._update(attempt=attempt, text="", status="pending", error=None)

    def stored(self, attempt: int, text: str, *, final: bool, error: str | None) -> None:
        """Record text the writer has just committed for ``attempt``."""
        status = ("failed" if error else "complete") if final else "streaming"
        with self._changed:  # re-entrant: _update takes it again
            if not self._ended and attempt == self._attempt:
                self._update(text=self._text + text, status=status, error=error)

    def end(self) -> None:
        self._update(ended=True)

    def _update(self, **changes) -> None:
        with self._changed:
            for name, value in changes.items():
                setattr(self, "_" + name, value)
            self._version += 1
            self._changed.notify_all()


class LiveReplies:
    """reply id -> LiveReply for the replies this process is generating."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: dict[int, LiveReply] = {}

    def start(self, reply_id: int) -> LiveReply:
        """Register a reply about to run here; a previous run of it (regenerated) ends."""
        live = LiveReply()
        with self._lock:
            previous = self._replies.get(reply_id)
            self._replies[reply_id] = live
        if previous is not None:
            previous.end()
        return live

    def get(self, reply_id: int) -> LiveReply | None:
        with self._lock:
            return self._replies.get(reply_id)

    def finish(self, reply_id: int, live: LiveReply) -> None:
        """The run of ``live`` is over: forget it (unless a newer run replaced it) and wake its streams."""
        with self._lock:
            if self._replies.get(reply_id) is live:
                del self._replies[reply_id]
        live.end()

    def __len__(self) -> int:
        with self._lock:
            return len(self._replies)


def init_app(app: Flask) -> None:
    app.extensions[EXTENSION_KEY] = LiveReplies()


def get_live_replies(app: Flask) -> LiveReplies:
    return app.extensions[EXTENSION_KEY]
