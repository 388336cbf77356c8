"""Server-sent events for a reply, read in one short transaction per poll.

The generator runs after the view has returned and its app context (and session) is
gone. Each poll pushes its own unit of work and ends it before sleeping, so a client
that disconnects, or a generator that is closed at any yield, holds nothing.
"""

from __future__ import annotations

import json
import time
from typing import Iterator

from flask import Flask

from chatapp.chat import services
from chatapp.db import unit_of_work
from chatapp.ops.metrics import job

KEEPALIVE_SECONDS = 15.0


def _event(data: str, event: str | None = None, event_id: str | None = None) -> str:
    lines = []
    if event:
        lines.append(f"event: {event}")
    if event_id:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return "\n".join(lines) + "\n\n"


def parse_last_event_id(value: str | None) -> tuple[int, int] | None:
    """``attempt:offset`` from an EventSource reconnect, or None."""
    if not value:
        return None
    attempt, _, offset = value.partition(":")
    if attempt.isdigit() and offset.isdigit():
        return int(attempt), int(offset)
    return None


def reply_events(app: Flask, reply_id: int, resume: tuple[int, int] | None = None) -> Iterator[str]:
    """Yield the reply's stored text, then its new text as it arrives, then one ``done`` event."""
    poll = app.config["STREAM_POLL_INTERVAL"]
    deadline = time.monotonic() + app.config["STREAM_MAX_SECONDS"]
    attempt, offset = resume if resume else (None, 0)
    last_sent = time.monotonic()
    yield "retry: 1000\n\n"
    while True:
        with job("stream"), unit_of_work(app, write=False):
            progress = services.read_reply_progress(reply_id, offset)
        # No session or connection is held past this point until the next poll.
        if progress is None:
            yield _event(json.dumps({"status": "deleted", "error": "the reply was deleted"}), "done")
            return
        if attempt is not None and progress["attempt"] != attempt:
            # The reply was regenerated: start over from its first character.
            attempt, offset = progress["attempt"], 0
            yield _event("", "reset")
            continue
        attempt = progress["attempt"]
        if progress["delta"]:
            offset += len(progress["delta"])
            yield _event(progress["delta"], event_id=f"{attempt}:{offset}")
            last_sent = time.monotonic()
        if progress["status"] in ("complete", "failed"):
            yield _event(json.dumps({"status": progress["status"], "error": progress["error"]}), "done")
            return
        if time.monotonic() >= deadline:
            return  # the client's EventSource reconnects with Last-Event-ID and resumes
        if time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        time.sleep(poll)
