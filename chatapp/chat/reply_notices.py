"""Reply notices through Redis pub/sub: a stream in one process wakes when another stores text.

With REPLY_EVENTS set to a Redis URL (by default REPLY_QUEUE's, in queue mode), the reply
writer publishes a small notice after each committed write, and a view after a committed
stop: ``{"reply": id, "attempt": n, "length": chars, "status": s}`` on the channel
``chatapp.reply.<id>``. The notice carries no text: the database stays the truth, and a
stream woken by it reads the new text there (one read per stored write).

A process has one subscriber connection, owned by one dispatcher thread, whatever the
number of its open streams: a stream registers the reply it waits on, the dispatcher
subscribes to that reply's channel (and unsubscribes when its last stream ends) and wakes
its streams when a notice, or the subscription's own confirmation, arrives. A stream waits
at most NOTICE_SAFETY_SECONDS before it reads the database anyway, so a missed notice
costs seconds, never a stuck stream.

Redis unreachable, or lost mid-run: one log line, every waiting stream is woken and polls
the database at STREAM_POLL_INTERVAL (``available`` is False), and the dispatcher
reconnects every RECONNECT_SECONDS; once it is back (logged too) it subscribes again and
wakes every stream to read what it may have missed. Publishing never fails a reply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time

from flask import Flask

log = logging.getLogger(__name__)

EXTENSION_KEY = "chatapp.reply_notices"
CHANNEL_PREFIX = "chatapp.reply."
# A stream waiting for a notice reads the database at least this often anyway.
NOTICE_SAFETY_SECONDS = 5.0
RECONNECT_SECONDS = 1.0
# How long the dispatcher blocks on its socket before it applies new (un)subscriptions.
_DISPATCH_TICK = 0.05


def channel(reply_id: int) -> str:
    return f"{CHANNEL_PREFIX}{int(reply_id)}"


class _Waiters:
    """The streams of one reply in this process: a version bumped on each wake."""

    def __init__(self) -> None:
        self.count = 0
        self.version = 0


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

    def publish(self, reply_id: int, attempt: int, length: int, status: str) -> None:
        """Tell every process's streams of ``reply_id`` that a write was committed; never raises."""
        if time.monotonic() - self._publish_failed_at < RECONNECT_SECONDS:
            return  # Redis just failed: don't make every flush wait on its timeout
        notice = json.dumps({"reply": reply_id, "attempt": attempt, "length": length, "status": status})
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
                    # A notice, or a new subscription confirmed (what came before it is in the database).
                    if message["type"] in ("message", "subscribe"):
                        self._wake(reply_id)
            except Exception as error:
                with self._changed:
                    self.available = False
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
        notices.publish(reply_id, attempt, length, "stopped")
