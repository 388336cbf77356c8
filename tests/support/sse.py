"""Reading Server-Sent Events: a reply's stream, as the in-process tests get it (a body, or
its chunks) and as a client of a real server reads it (requests, streamed).

chatapp streams a reply as unnamed events carrying text deltas, ``reset`` when the reply
starts over (regenerated, or taken over after its process died), and ``done`` with
``{"status": ..., "error": ...}`` at the end; every event has an ``id`` a client sends back
as Last-Event-ID to resume. The parser follows the SSE specification: lines end at CR, LF
or CRLF only (not at U+2028 and the like, as str.splitlines would have it), ``field: value``
loses one space after the colon, data lines join with newlines, an event is dispatched at a
blank line, and an id with a NUL is ignored: what a browser's EventSource sees.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import requests

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass
class Event:
    name: str  # "message" when the event has no ``event:`` field
    data: str
    id: str | None = None  # the last id seen so far in the stream, as a browser keeps it


def iter_events(chunks: Iterable[bytes | str]) -> Iterator[Event]:
    """Events from a stream's chunks as they arrive (a line may span chunks)."""
    pending = b""
    name, data, last_id = None, [], None

    def lines_of(chunk: bytes, final: bool) -> list[bytes]:
        nonlocal pending
        text = pending + chunk
        lines = _LINE_END.split(text)
        pending = lines.pop()  # no line end yet
        if lines and not final and text.endswith(b"\r"):
            pending = lines.pop() + b"\r"  # the CR may be the first half of a CRLF
        return lines

    for chunk in itertools.chain(chunks, [None]):  # None: the stream ended
        final = chunk is None
        for raw in lines_of(b"" if final else chunk.encode() if isinstance(chunk, str) else chunk, final):
            line = raw.decode("utf-8")
            if line == "":
                if data:
                    yield Event(name or "message", "\n".join(data), last_id)
                name, data = None, []
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            elif field == "id" and "\x00" not in value:  # an id with a NUL is ignored
                last_id = value
            # A line starting with ":" is a comment (a keep-alive): nothing to do.


def parse_events(body: str | bytes) -> list[tuple[str, str]]:
    """(event name, data) of every complete event in an SSE body."""
    return [(event.name, event.data) for event in iter_events([body])]


@dataclass
class Reply:
    """What a client read of a reply's stream."""

    text: str  # the deltas since the last reset
    status: str | None  # the ``done`` event's status; None when the stream ended without one
    http_status: int
    last_event_id: str | None = None
    abandoned: bool = False  # stop_after_first: the client hung up after the first delta
    reset: bool = False  # a ``reset`` came: the text read before it was dropped


def read_reply(
    session: requests.Session | None,
    url: str,
    *,
    headers: dict | None = None,
    timeout: tuple | float = (10, 120),
    stop_after_first: bool = False,
) -> Reply:
    """GET a reply's stream and read it to its ``done`` event (or, with ``stop_after_first``,
    to the first text delta, then hang up)."""
    http = session or requests
    text: list[str] = []
    last_id, reset = None, False
    with http.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code != 200:
            return Reply("", None, response.status_code)
        for event in iter_events(response.iter_content(chunk_size=None)):
            last_id = event.id
            if event.name == "done":
                return Reply("".join(text), json.loads(event.data)["status"], 200, last_id, reset=reset)
            if event.name == "reset":
                text.clear()
                reset = True
            elif event.name == "message":
                text.append(event.data)
                if stop_after_first:
                    return Reply("".join(text), None, 200, last_id, abandoned=True, reset=reset)
    return Reply("".join(text), None, 200, last_id, reset=reset)
