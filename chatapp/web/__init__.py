"""The browser UI: server-rendered pages on the request's session, plus a little JavaScript.

The page's scripts talk to the JSON API with the login cookie and a CSRF header; the
views here render pages and handle the forms (which also work without JavaScript).
"""

from __future__ import annotations

from flask import Blueprint, request
from flask_wtf.csrf import CSRFError

from chatapp.auth import login_sessions
from chatapp.db import remove_session
from chatapp.errors.handlers import error_response, handle_http_exception
from chatapp.web.forms import sentence

bp = Blueprint("web", __name__)


@bp.record_once
def _configure_login(state) -> None:
    login_manager = state.app.login_manager
    login_manager.login_view = "web.login"
    login_manager.login_message = "Log in to continue."
    login_manager.login_message_category = "info"


# Every request a login cookie authenticated, pages and the API alike.
bp.after_app_request(login_sessions.record_use)


@bp.errorhandler(429)
def too_many_requests(error):
    """Over a rate limit: the login form says so on the login page, other forms on the error page."""
    if request.endpoint == "web.login":
        remove_session()  # an error page: rendered holding no transaction
        return accounts.too_many_logins(error)
    return handle_http_exception(error)


@bp.app_template_filter("sentence")
def sentence_filter(message: str) -> str:
    """API-style messages ("no such resource; check the URL") as sentences on pages."""
    return sentence(message)


@bp.errorhandler(CSRFError)
def csrf_failed(error: CSRFError):
    """A form without a valid CSRF token: say what to do instead of Flask-WTF's terse reason."""
    return error_response(
        400,
        "csrf_failed",
        "This form has expired or did not come from this site. Reload the page and try again.",
    )


from chatapp.web import accounts, chats, new_chat, settings  # noqa: E402,F401  (views register on bp)
