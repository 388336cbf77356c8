"""Domain errors raised by services; the API renders them as JSON, the web UI as page messages."""

from __future__ import annotations


class AppError(Exception):
    """An expected failure with an HTTP status, a short code and a message for people."""

    status = 400
    code = "bad_request"
    # Seconds a client should wait before trying again (sent as Retry-After), if any.
    retry_after: int | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        fields: dict[str, list[str]] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.field = field
        # Every field's problems, when one request has several (sent as error.fields).
        self.fields = fields
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


class TooManyRequests(AppError):
    """One user holds as much of a resource as one user may; retry once some is freed."""

    status = 429
    code = "too_many_requests"
    retry_after = 5


class ServiceBusy(AppError):
    """The server is at capacity for everyone; nothing was done, retry shortly."""

    status = 503
    code = "busy"
    retry_after = 2
