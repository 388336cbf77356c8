"""A request id on every request: the caller's X-Request-ID if sane, else a new one.

It is echoed as a response header, so gunicorn's access log (gunicorn.conf.py) and the
proxy's log can print the same id, and it is named in the app's own warnings.
"""

from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g, request

HEADER = "X-Request-ID"
# Ids from outside end up in log lines: nothing that could forge or split one.
_ACCEPTED = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def assign_request_id() -> None:
    sent = request.headers.get(HEADER, "")
    g.request_id = sent if _ACCEPTED.fullmatch(sent) else uuid.uuid4().hex


def echo_request_id(response: Response) -> Response:
    response.headers[HEADER] = g.get("request_id") or uuid.uuid4().hex
    return response


def init_app(app: Flask) -> None:
    # First before_request function: requests refused by a later hook still get an id.
    app.before_request_funcs.setdefault(None, []).insert(0, assign_request_id)
    app.after_request(echo_request_id)
