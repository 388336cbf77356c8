"""How many reply streams each user has open in this process, capped at STREAMS_PER_USER.

An open stream holds one of the worker's threads for as long as it lasts (gthread), or
one of its worker_connections (gevent: a greenlet and a socket), so without a cap one
user could open enough streams to leave nobody else a thread or a connection. The count
is per process: what it protects is this worker's capacity. A stream's slot is
given back when its response is closed, which the WSGI server does however the stream
ends: the reply finished, the client went away, or the generator failed.
"""

from __future__ import annotations

import threading
from collections import Counter

from flask import Flask

from chatapp.errors import TooManyRequests

EXTENSION_KEY = "chatapp.stream_slots"


class StreamSlots:
    """Open streams per user id; a lock guards the counts (streams open on many threads or greenlets)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: Counter[int] = Counter()

    def take(self, user_id: int, per_user: int) -> StreamSlot:
        """One more stream for ``user_id``, or TooManyRequests if they hold ``per_user`` already."""
        with self._lock:
            if self._open[user_id] >= per_user:
                raise TooManyRequests(
                    f"you already have {per_user} reply streams open, the most one user may; "
                    "close one (or let a reply finish) and retry",
                    code="too_many_streams",
                )
            self._open[user_id] += 1
        return StreamSlot(self, user_id)

    def open_streams(self, user_id: int) -> int:
        with self._lock:
            return self._open[user_id]

    def _give_back(self, user_id: int) -> None:
        with self._lock:
            self._open[user_id] -= 1
            if self._open[user_id] <= 0:
                del self._open[user_id]  # users with no stream take no memory


class StreamSlot:
    """One user's hold on one stream; ``release`` is safe to call more than once."""

    def __init__(self, slots: StreamSlots, user_id: int):
        self._slots = slots
        self._user_id = user_id
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._slots._give_back(self._user_id)


def get_stream_slots(app: Flask) -> StreamSlots:
    # Made on first use (setdefault is atomic, so two first streams share one), which
    # leaves create_app nothing to set up.
    slots = app.extensions.get(EXTENSION_KEY)
    if slots is None:
        slots = app.extensions.setdefault(EXTENSION_KEY, StreamSlots())
    return slots


def take(app: Flask, user_id: int) -> StreamSlot:
    """A slot for one more of ``user_id``'s streams; release it when the response closes."""
    return get_stream_slots(app).take(user_id, app.config["STREAMS_PER_USER"])
