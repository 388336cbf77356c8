"""Who is calling the API: a Bearer token, or the browser's login session (with CSRF)."""

from __future__ import annotations

import functools
import logging

from flask import Response, g, request, session
from flask_login import current_user

from chatapp.auth import login_sessions
from chatapp.auth import services as auth
from chatapp.db import begin_write, db
from chatapp.errors import Unauthorized
from chatapp.extensions import csrf

log = logging.getLogger(__name__)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
INVALID_TOKEN = "the token is invalid or revoked; create a new one with POST /api/v1/tokens"


def require_user() -> None:
    """Set g.user_id from the Bearer token or the login cookie, or answer 401.

    A Bearer request reads only plain columns (no ORM object): g.api_token is that row
    (id, user_id, last_used_at); views need only the id. g.credential names the token or
    the login session as plain data, for a stream to re-check while it runs.
    """
    header = request.headers.get("Authorization")
    g.api_token = None
    g.credential = None
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'", code="invalid_token")
        row = auth.find_active_token(token.strip())
        if row is None:
            raise Unauthorized(INVALID_TOKEN, code="invalid_token")
        g.user_id = row.user_id
        g.api_token = row
        g.credential = auth.Credential("token", row.id)
        return
    if current_user.is_authenticated:
        if request.method not in SAFE_METHODS:
            # Cookies ride along on cross-site requests; the CSRF token does not.
            csrf.protect()
        g.user_id = current_user.id
        g.credential = auth.Credential("login_session", login_sessions.current_session_id())
        return
    if session.get("_user_id") is not None:
        # The cookie names a login that has ended (logged out elsewhere, expired, account
        # deleted): the page's script tells its person to log in again, not about tokens.
        raise Unauthorized("your login session has ended; log in again", code="session_ended")
    raise Unauthorized(
        "authentication required: send 'Authorization: Bearer <token>' (create a token with POST /api/v1/tokens)",
        code="unauthorized",
    )


def authenticated(view):
    """require_user() for one view of a blueprint that does not authenticate every request."""

    @functools.wraps(view)
    def authenticate_first(*args, **kwargs):
        require_user()
        return view(*args, **kwargs)

    return authenticate_first


def current_user_id() -> int:
    """The caller's id, known without a query: what most views need."""
    return g.user_id


def record_token_use(response: Response) -> Response:
    """Stamp the token's last_used_at in its own short write, after the view's work is done."""
    token = g.get("api_token")
    if token is None or response.status_code >= 400 or not auth.token_needs_touch(token):
        return response
    token_id = token.id
    try:
        db.session.rollback()  # the view's transaction has ended (chatapp.db.policy); this is a write of its own
        begin_write()
        auth.touch_token(token_id)
        db.session.commit()
    except Exception:  # a hint for people, never worth failing the request over
        db.session.rollback()
        log.warning("could not record use of token %s", token_id, exc_info=True)
    return response
