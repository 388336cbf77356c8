"""Security headers on every response, input the database cannot store refused at the door,
bounded ids in URLs, and the client address behind a proxy."""

from __future__ import annotations

from flask import Flask, Response, request
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

from chatapp.errors import InvalidInput

# Pages load scripts, styles and images from this site only; nothing may frame them.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


# The largest id (and text offset) a PostgreSQL integer column or parameter holds: a larger
# number in a query is an overflow error from the driver, a 500.
MAX_ID = 2**31 - 1


def parse_bounded_int(text: str, maximum: int = MAX_ID) -> int | None:
    """A whole number 0..maximum written in ASCII digits, else None.

    str.isdigit() alone accepts "²" (which int() refuses) and "１２" (which int() reads), and
    int() accepts signs, spaces and underscores; ids and offsets we hand out are none of those.
    The length check comes first, so no huge string is ever converted.
    """
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(maximum)):
        return None
    value = int(text)
    return value if value <= maximum else None


class IdConverter(IntegerConverter):
    """``<int:...>`` in every route: an id the id columns can hold (PostgreSQL integer).

    A larger number is no route at all (404), rather than a query the driver refuses
    with an overflow error (a 500). The OpenAPI document shows the bound as maximum.
    """

    def __init__(self, map, fixed_digits=0, min=None, max=MAX_ID, signed=False):
        super().__init__(map, fixed_digits=fixed_digits, min=min, max=max, signed=signed)


def refuse_nul_characters() -> None:
    """PostgreSQL text cannot hold NUL (storing one is a 500): refuse it in query strings and forms.

    JSON bodies are checked field by field by the API's schemas, which name the field.
    Parsed only when they can hold one: a decoded query string has a NUL only if the raw
    one has a NUL byte or "%00", and Werkzeug parses a form only from these two types
    (request.form is empty otherwise), so most requests parse neither here.
    """
    query = request.query_string
    if b"\x00" in query or b"%00" in query:
        _refuse_nul(request.args)
    if request.mimetype in _FORM_TYPES:
        _refuse_nul(request.form)


_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


def _refuse_nul(values) -> None:
    for key, value in values.items(multi=True):
        if "\x00" in key or "\x00" in value:
            raise InvalidInput("text must not contain NUL characters")


def init_app(app: Flask) -> None:
    """Call before any blueprint is registered: their rules use the id converter."""
    app.url_map.converters["int"] = IdConverter
    app.before_request(refuse_nul_characters)
    x_for, x_proto = int(app.config["PROXY_FIX_X_FOR"]), int(app.config["PROXY_FIX_X_PROTO"])
    if x_for or x_proto:
        # Trust exactly as many X-Forwarded-* hops as there are proxies; trusting more
        # would let any client choose its own address and dodge the rate limits.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=x_for, x_proto=x_proto)  # type: ignore[method-assign]  # as Flask documents
    headers = dict(HEADERS)
    if int(app.config["HSTS_SECONDS"]) > 0:
        # Only behind TLS: a browser that saw it refuses plain HTTP for max-age seconds.
        headers["Strict-Transport-Security"] = f"max-age={int(app.config['HSTS_SECONDS'])}; includeSubDomains"

    # Lower-cased once: headers.setdefault() would scan the response's headers twice
    # per name, four or five times per response.
    security_headers = [(name.lower(), name, value) for name, value in headers.items()]

    @app.after_request
    def add_security_headers(response: Response) -> Response:
        """Every response, errors included, carries the same headers (a view's own win)."""
        sent = {name.lower() for name, _value in response.headers.items()}
        for lower, name, value in security_headers:
            if lower not in sent:
                response.headers.add(name, value)
        return response
