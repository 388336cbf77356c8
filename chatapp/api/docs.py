"""Shared OpenAPI annotations for the API's views."""

from __future__ import annotations

from chatapp.api.schemas import ErrorOut

DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing, malformed or revoked credentials",
    403: "Not allowed",
    404: "Not found (or not yours)",
    409: "Conflicts with the current state",
    413: "Body larger than 1 MB",
    415: "Body is not JSON",
    422: "A field is missing or invalid",
    429: "Too many requests from this address or user (to log in, for this username), or "
    "too many open streams; retry after Retry-After seconds",
    503: "Database busy or unavailable, or too many replies or password checks waiting; "
    "retry after Retry-After seconds",
}


def error_responses(blp, *codes: int, authenticated: bool = True):
    """Document the error responses a view can give, in chatapp's error shape."""

    def decorate(view):
        for code in codes:
            view = blp.alt_response(code, schema=ErrorOut, description=DESCRIPTIONS[code])(view)
        if authenticated:
            view = blp.doc(security=[{"bearer": []}])(view)
        return view

    return decorate
