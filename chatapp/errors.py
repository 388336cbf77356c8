"""Domain errors raised by services; the API renders them as JSON, the web UI as page messages."""

from __future__ import annotations


class AppError(Exception):
    """An expected failure with an HTTP status, a short code and a message for people."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code


class InvalidInput(AppError):
    status = 422
    code = "invalid"


class NotFound(AppError):
    status = 404
    code = "not_found"


class Conflict(AppError):
    status = 409
    code = "conflict"


class Unauthorized(AppError):
    status = 401
    code = "unauthorized"


class Forbidden(AppError):
    status = 403
    code = "forbidden"


class ServiceUnavailable(AppError):
    status = 503
    code = "unavailable"
