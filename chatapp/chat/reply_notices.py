"""Reply notices through Redis pub/sub: a stream in one process wakes when another stores text.

With REPLY_EVENTS set to a Redis URL (by default REPLY_QUEUE's, in queue mode), the reply
writer publishes a notice after each committed write, and a view after a committed stop:
``{"reply": id, "attempt": n, "length": chars, "start": chars, "text": s, "status": s,
"error": e}`` on the channel ``chatapp.reply.<id>``, where ``text`` is what that commit added
(from character ``start``, Python str characters, to ``length``). A chunk longer than
NOTICE_TEXT_MAX_CHARS is published without ``start`` and ``text``. The dispatcher keeps the last
CHUNKS_KEPT chunks of each reply its streams wait on; a woken stream takes the run of them
that continues exactly from its own (attempt, offset), with no database read. Anything else
(a gap, another attempt, a notice without text or malformed, a stream fallen behind the
kept chunks, Redis lost) sends it to the database, which stays the truth.

A process has one subscriber connection, owned by one dispatcher thread, whatever the
number of its open streams: a stream registers the reply it waits on, the dispatcher
subscribes to that reply's channel (and unsubscribes when its last stream ends) and wakes
its streams when a notice, or the subscription's own confirmation, arrives (what was
published before it is read from the database: a stream that starts before its process is
subscribed to its reply reads once more). A stream waits at most NOTICE_SAFETY_SECONDS
before it reads the database anyway, so a missed notice costs seconds, never a stuck stream.

Redis unreachable, or lost mid-run: one log line, every waiting stream is woken and polls
the database at STREAM_POLL_INTERVAL (``available`` is False), and the dispatcher
reconnects every RECONNECT_SECONDS; once it is back (logged too) it subscribes again and
wakes every stream to read what it may have missed. Publishing never fails a reply.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from typing import NamedTuple

from flask import Flask

log = logging.getLogger(__name__)

EXTENSION_KEY = "chatapp.reply_notices"
CHANNEL_PREFIX = "chatapp.reply."
# A stream waiting for a notice reads the database at least this often anyway.
NOTICE_SAFETY_SECONDS = 5.0
# A notice carries at most this much text (one flush's worth, normally far less); a longer
# chunk is published without it, and the streams read it from the database.
NOTICE_TEXT_MAX_CHARS = 16_000
# Chunks kept per reply with streams here: a stream further behind reads the database.
CHUNKS_KEPT = 32
RECONNECT_SECONDS = 1.0
# How long the dispatcher blocks on its socket before it applies new (un)subscriptions.
_DISPATCH_TICK = 0.05


def channel(reply_id: int) -> str:
    return f"{CHANNEL_PREFIX}{int(reply_id)}"


class Chunk(NamedTuple):
    """One notice as received: ``text`` (None if it came without) starts at character ``start``."""

    seq: int  # the reply's wake version it brought
    attempt: int
    start: int
    text: str | None
    status: str
    error: str | None


class _Waiters:
    """The streams of one reply in this process: a version bumped on each wake, recent chunks."""

    def __init__(self) -> None:
        self.count = 0
        self.version = 0
        self.confirmed = False  # subscribed: every notice from now on arrives (or Redis is lost)
        self.chunks: deque[Chunk] = deque(maxlen=CHUNKS_KEPT)
        self.dropped_seq = 0  # the newest chunk pushed out of ``chunks``


class ReplyNotices:
    """This process's publisher and its one subscriber (started with the first stream)."""

    def __init__(self, url: str, timeout: float) -> None:
        try:
            import redis  # the [redis] extra: imported only when REPLY_EVENTS (or queue mode) is set
        except ImportError:
            raise RuntimeError(
                "REPLY_EVENTS (or REPLY_QUEUE) names a Redis, but redis-py is not installed: "
                "pip install 'chatapp[redis]'"
            ) from None
        self._redis = redis
        self.url = url
        self._timeout = timeout
        self._publisher = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._publish_failed_at = float("-inf")
        self._changed = threading.Condition()
        self._waiters: dict[int, _Waiters] = {}
        self._pending: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.available = False  # the subscriber is connected: streams may wait for notices
        self._stopping = threading.Event()

    # The writer's side.

    def publish(
        self, reply_id: int, attempt: int, length: int, status: str, text: str | None = None, error: str | None = None
    ) -> None:
        """Tell every process's streams of ``reply_id`` that a write (``text``, ending at
        character ``length``) was committed; never raises."""
        if time.monotonic() - self._publish_failed_at < RECONNECT_SECONDS:
            return  # Redis just failed: don't make every flush wait on its timeout
        fields: dict = {"reply": reply_id, "attempt": attempt, "length": length, "status": status, "error": error}
        if text is not None and len(text) <= NOTICE_TEXT_MAX_CHARS:
            fields.update(start=length - len(text), text=text)
        notice = json.dumps(fields)
        try:
            self._publisher.publish(channel(reply_id), notice)
        except self._redis.RedisError as error:
            if self._publish_failed_at == float("-inf") or time.monotonic() - self._publish_failed_at > 60:
                log.error("reply notices: cannot publish to Redis (%s); streams elsewhere poll the database", error)
            self._publish_failed_at = time.monotonic()

    def publish_ready(self) -> bool:
        """False for RECONNECT_SECONDS after a failed publish (which skips publishing meanwhile)."""
        return time.monotonic() - self._publish_failed_at >= RECONNECT_SECONDS

    # The streams' side.

    def register(self, reply_id: int) -> None:
        """A stream of ``reply_id`` opened here; call ``unregister`` when it ends."""
        self._ensure_thread()
        with self._changed:
            waiters = self._waiters.setdefault(reply_id, _Waiters())
            waiters.count += 1
            first = waiters.count == 1
        if first:
            self._pending.put(("subscribe", reply_id))

    def unregister(self, reply_id: int) -> None:
        with self._changed:
            waiters = self._waiters.get(reply_id)
            if waiters is None:
                return
            waiters.count -= 1
            last = waiters.count <= 0
            if last:
                del self._waiters[reply_id]
        if last:
            self._pending.put(("unsubscribe", reply_id))

    def version(self, reply_id: int) -> int:
        """Take before reading the database: a notice after the read changes it."""
        with self._changed:
            waiters = self._waiters.get(reply_id)
            return waiters.version if waiters is not None else 0

    def confirmed(self, reply_id: int) -> bool:
        """This process is subscribed to ``reply_id``'s notices (take before a read)."""
        with self._changed:
            waiters = self._waiters.get(reply_id)
            return self.available and waiters is not None and waiters.confirmed

    def take(self, reply_id: int, attempt: int, offset: int, since: int) -> tuple[int, dict | None, bool]:
        """(version, progress, whole) from the chunks received past version ``since``.

        ``progress`` (shaped like ``services.read_reply_progress``) is their run that continues
        exactly from (``attempt``, ``offset``); None if there is none: read the database. ``whole``
        is False when some chunk past the run could not be used (a gap, another attempt, no
        text): the stream reads the database next.
        """
        with self._changed:
            waiters = self._waiters.get(reply_id)
            if waiters is None or not self.available:
                return 0, None, False
            if waiters.dropped_seq > since:
                return waiters.version, None, False  # fallen behind the kept chunks
            delta: list[str] = []
            status, error, whole = "streaming", None, True
            for chunk in itertools.dropwhile(lambda chunk: chunk.seq <= since, waiters.chunks):
                ends_before = chunk.text is not None and chunk.start + len(chunk.text) <= offset
                if chunk.attempt < attempt or (chunk.attempt == attempt and ends_before and chunk.start != offset):
                    continue  # what the stream has already sent (a read may have brought it first)
                if chunk.attempt == attempt and chunk.text is not None and chunk.start == offset and whole:
                    delta.append(chunk.text)
                    offset += len(chunk.text)
                    status, error = chunk.status, chunk.error
                else:
                    whole = False
            if not delta and status == "streaming":
                return waiters.version, None, False
            progress = {"attempt": attempt, "delta": "".join(delta), "status": status, "error": error}
            return waiters.version, progress, whole

    def wait(self, reply_id: int, version: int, timeout: float) -> bool:
        """Block until a notice for ``reply_id`` past ``version``, Redis is lost, or ``timeout``; True if woken."""
        with self._changed:
            return self._changed.wait_for(
                lambda: (
                    not self.available
                    or (self._waiters.get(reply_id) is not None and self._waiters[reply_id].version != version)
                ),
                timeout,
            )

    def _received(self, reply_id: int, data) -> None:
        """Keep a notice's chunk (if it is well formed) and wake the reply's streams."""
        try:
            notice = json.loads(data)
            fields = (notice["attempt"], notice["length"], notice["status"], notice.get("error"), notice.get("text"))
        except (ValueError, TypeError, KeyError):
            fields = None
        with self._changed:
            waiters = self._waiters.get(reply_id)
            if waiters is None:
                return
            waiters.version += 1
            if fields is not None and notice.get("reply") == reply_id:
                attempt, length, status, error, text = fields
                start = notice.get("start", length)
                well_formed = (
                    all(type(number) is int for number in (attempt, length, start))
                    and isinstance(status, str)
                    and (error is None or isinstance(error, str))
                    and (text is None or (isinstance(text, str) and start + len(text) == length))
                )
                if well_formed:
                    if len(waiters.chunks) == waiters.chunks.maxlen:
                        waiters.dropped_seq = waiters.chunks[0].seq
                    waiters.chunks.append(Chunk(waiters.version, attempt, start, text, status, error))
            self._changed.notify_all()

    def _confirmed(self, reply_id: int) -> None:
        with self._changed:
            waiters = self._waiters.get(reply_id)
            if waiters is not None:
                # A wake with no chunk: streams that read before it read again.
                waiters.confirmed = True
                waiters.version += 1
                self._changed.notify_all()

    def _wake(self, reply_id: int | None = None) -> None:
        with self._changed:
            targets = self._waiters.values() if reply_id is None else [self._waiters.get(reply_id)]
            for waiters in targets:
                if waiters is not None:
                    waiters.version += 1
            self._changed.notify_all()

    # The dispatcher.

    def _ensure_thread(self) -> None:
        with self._changed:
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                return
            self._pid = os.getpid()  # a forked child starts its own
            self._thread = threading.Thread(target=self._dispatch_forever, name="reply-notices", daemon=True)
            self._thread.start()

    def _dispatch_forever(self) -> None:
        lost_logged = False
        while not self._stopping.is_set():
            pubsub = None
            try:
                client = self._redis.Redis.from_url(
                    self.url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
                )
                pubsub = client.pubsub(ignore_subscribe_messages=False)
                with self._changed:
                    subscribed = {channel(reply_id) for reply_id in self._waiters}
                # Drop queued changes: the set just read is the whole truth.
                while not self._pending.empty():
                    self._pending.get_nowait()
                pubsub.subscribe(*(subscribed or {CHANNEL_PREFIX + "none"}))
                pubsub.get_message(timeout=self._timeout)  # the first confirmation: connected
                with self._changed:
                    self.available = True
                if lost_logged:
                    log.warning("reply notices: Redis is back; streams wait for notices again")
                    lost_logged = False
                self._wake()  # whatever was published meanwhile: read it
                while not self._stopping.is_set():
                    self._apply_pending(pubsub)
                    message = pubsub.get_message(timeout=_DISPATCH_TICK)
                    if message is None:
                        continue
                    name = message.get("channel")
                    if isinstance(name, bytes):
                        name = name.decode()
                    if not isinstance(name, str) or not name.startswith(CHANNEL_PREFIX):
                        continue
                    try:
                        reply_id = int(name[len(CHANNEL_PREFIX) :])
                    except ValueError:
                        continue
                    if message["type"] == "message":
                        self._received(reply_id, message.get("data"))
                    elif message["type"] == "subscribe":
                        self._confirmed(reply_id)
            except Exception as error:
                with self._changed:
                    self.available = False
                    for waiters in self._waiters.values():
                        waiters.confirmed = False  # subscribed again (and confirmed) once Redis is back
                        waiters.chunks.clear()
                    self._changed.notify_all()
                if not lost_logged:
                    log.error(
                        "reply notices: Redis is unreachable (%s); streams poll the database until it is back", error
                    )
                    lost_logged = True
                self._stopping.wait(RECONNECT_SECONDS)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()

    def stop(self) -> None:
        """End the dispatcher (tests; a process exiting needs nothing: the thread is a daemon)."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(5)

    def _apply_pending(self, pubsub) -> None:
        while not self._pending.empty():
            action, reply_id = self._pending.get_nowait()
            with self._changed:
                wanted = reply_id in self._waiters
            if action == "subscribe" and wanted:
                pubsub.subscribe(channel(reply_id))
            elif action == "unsubscribe" and not wanted:
                pubsub.unsubscribe(channel(reply_id))


def events_url(config) -> str:
    """REPLY_EVENTS, else REPLY_QUEUE's URL in queue mode; "" (or "off") for none: streams poll."""
    url = config.get("REPLY_EVENTS") or config.get("REPLY_QUEUE") or ""
    return "" if url == "off" else str(url)


def init_app(app: Flask) -> None:
    url = events_url(app.config)
    app.extensions[EXTENSION_KEY] = ReplyNotices(url, float(app.config["REPLY_QUEUE_TIMEOUT"])) if url else None


def get_reply_notices(app: Flask) -> ReplyNotices | None:
    return app.extensions.get(EXTENSION_KEY)


def publish_stopped(app: Flask, reply_id: int, attempt: int, length: int) -> None:
    """After a committed stop (a view): streams elsewhere end "stopped" now, not at their re-check."""
    notices = get_reply_notices(app)
    if notices is not None:
        notices.publish(reply_id, attempt, length, "stopped", text="")
