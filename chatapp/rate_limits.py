"""Rate limits: per client address on the doors that guess passwords or create accounts
(tokens, registration, login), and per user on the work that costs (messages, which start
a bot reply; regenerations; new conversations).

Flask-Limiter counts in RATELIMIT_STORAGE_URI: this process's memory by default, or, in
queue mode (REPLY_QUEUE set) with no RATELIMIT_STORAGE_URI, the queue's Redis, so that
every host and worker draws on one count. While that Redis is unreachable each process
counts in its own memory (RATELIMIT_IN_MEMORY_FALLBACK_ENABLED) and says so in its log;
it goes back to Redis once Redis answers. Password guesses are also counted per username they name, whatever
address they come from. The limit strings are read from the app's config on each request,
so an operator changes them without touching code, and tests turn them on only where they
test them. A request over its limit raises Flask-Limiter's
RateLimitExceeded (a 429), which chatapp.errors.handlers renders as JSON under /api.
"""

from __future__ import annotations

import functools
import hashlib
import logging

from flask import Flask, current_app, g, request
from flask_limiter.util import get_remote_address
from flask_login import current_user

from chatapp.db import end_transaction
from chatapp.extensions import limiter

log = logging.getLogger(__name__)


def holding_nothing(limit):
    """``limit`` (a Flask-Limiter decorator) checked after the authentication read has ended.

    The count may live in Redis, which can take up to its socket timeout to answer (or to
    fail over to memory): no database connection is held meanwhile. Only on views that
    write, whose transaction would end that read anyway.
    """

    def decorate(view):
        limited = limit(view)

        @functools.wraps(limited)
        def end_the_read_first(*args, **kwargs):
            end_transaction()
            return limited(*args, **kwargs)

        return end_the_read_first

    return decorate


def configured(key: str):
    """A limit read from config key ``key`` (e.g. "10 per minute;100 per hour") at request time."""
    return holding_nothing(limiter.limit(lambda: current_app.config[key], methods=["POST"]))


def login_username() -> str:
    """The username a login attempt names (form or JSON body), case-folded; else the address.

    Hashed, so that the limit's storage (Redis) holds no usernames; a body that names
    none, or not as a string, is counted by its client address.
    """
    if request.is_json:
        body = request.get_json(silent=True)
        username = body.get("username") if isinstance(body, dict) else None
    else:
        username = request.form.get("username")
    if isinstance(username, str) and username:
        return "username:" + hashlib.sha256(username.casefold().encode()).hexdigest()
    return get_remote_address()


tokens = configured("RATELIMIT_TOKENS")
registration = configured("RATELIMIT_REGISTER")
login = configured("RATELIMIT_LOGIN")
# One count per username for the login form and POST /api/v1/tokens together, so that
# guesses cannot double their allowance by using both doors.
login_per_username = holding_nothing(
    limiter.shared_limit(
        lambda: current_app.config["RATELIMIT_LOGIN_USERNAME"],
        scope="login-username",
        key_func=login_username,
        methods=["POST"],
        # Failed attempts only: someone guessing at an account cannot also use up its owner's
        # successful logins (the owner is still held back once the guesses reach the limit).
        deduct_when=lambda response: response.status_code >= 400,
    )
)


def user_key() -> str:
    """The signed-in user, whichever door they came through: the API sets g.user_id
    (chatapp.api.auth.require_user, before the view), a browser form has current_user."""
    user_id = g.get("user_id")
    if user_id is None:
        user_id = current_user.id  # the limit sits under @login_required
    return f"user:{user_id}"


def per_user(key: str, scope: str):
    """A limit from config key ``key``, counted per user in one bucket named ``scope``.

    Shared: the API view and the browser form doing the same thing draw on one count, so a
    user gets the same allowance whichever they use. Decorate the view under the checks
    that establish who the user is (the API's before_request, or @login_required).
    """
    return holding_nothing(
        limiter.shared_limit(lambda: current_app.config[key], scope, key_func=user_key, methods=["POST"])
    )


# Password checks of a signed-in user (changing the password, deleting the account): guesses
# at the current password by whoever holds a session or token are limited as logins are.
password_checks = holding_nothing(
    limiter.shared_limit(
        lambda: current_app.config["RATELIMIT_LOGIN_USERNAME"],
        scope="password-checks",
        key_func=user_key,
        methods=["POST", "DELETE"],
        deduct_when=lambda response: response.status_code >= 400,
    )
)
messages = per_user("RATELIMIT_MESSAGES", "user-messages")
conversations = per_user("RATELIMIT_CONVERSATIONS", "user-conversations")
regenerations = per_user("RATELIMIT_REGENERATE", "user-regenerations")


def init_app(app: Flask) -> None:
    # Flask-Limiter keeps one storage per extension object: every app this process
    # creates (one in production, one per test) starts it afresh from its own config.
    # ...except for what init_app keeps from an earlier app (private names, hence the upper
    # bound on flask-limiter). The strategy and key prefix would stay the first app's. And
    # "the storage is down, count in memory", left set by an app whose Redis was down, would
    # split the next app's counts between a throwaway memory store and its own storage
    # (whichever a backed-off health check picks), letting through more than the limit.
    limiter._strategy = None
    limiter._key_prefix = ""
    limiter._storage_dead = False
    limiter._storage_options = {}
    shared = _choose_storage(app)
    limiter.init_app(app)
    if shared and limiter.enabled:
        app.after_request(_StorageWatch())
    if limiter.enabled and not _limits_beyond_decorators():
        # Flask-Limiter's before_request hook works out, on every request, which
        # application, default, meta, blueprint or fallback limits apply; the limits
        # above are decorators, which check themselves when their view is called. With
        # none of the others configured the hook finds nothing, at a cost higher than
        # any other hook's, so it goes. Its after_request (X-RateLimit-* headers) and
        # teardown stay.
        app.before_request_funcs[None].remove(limiter._check_request_limit)


def _choose_storage(app: Flask) -> bool:
    """RATELIMIT_STORAGE_URI if set; else the queue's Redis in queue mode; else memory.

    The queue's own Redis URL, database number included: Flask-Limiter's keys all start
    "LIMITS:", which none of Celery's, the sweep's or the reply notices' do, and counts
    that a flush of that database resets cost only a fresh minute's allowance.
    Returns whether the counts live in a storage shared between processes.
    """
    config = app.config
    if config.get("RATELIMIT_STORAGE_URI"):
        return not str(config["RATELIMIT_STORAGE_URI"]).startswith("memory://")
    queue = config.get("REPLY_QUEUE")
    if not queue:
        config["RATELIMIT_STORAGE_URI"] = "memory://"
        return False
    config["RATELIMIT_STORAGE_URI"] = queue
    # As every Redis call a request makes: a dark Redis costs a request this long, once,
    # before the count moves to memory (then Redis is retried at growing intervals).
    timeout = float(config["REPLY_QUEUE_TIMEOUT"])
    config["RATELIMIT_STORAGE_OPTIONS"] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        **config.get("RATELIMIT_STORAGE_OPTIONS", {}),
    }
    if config.get("RATELIMIT_ENABLED", True):
        log.info(
            "rate limits are counted in the reply queue's Redis (REPLY_QUEUE), shared by every "
            "process; in this process's memory while it is unreachable"
        )
    return True


class _StorageWatch:
    """Logs when this process's counts move to memory (the shared storage is down) and back.

    Flask-Limiter says so only to a logger with a NullHandler, which an app that configures
    no logging never shows: an operator must see that the limits stopped being shared.
    """

    def __init__(self) -> None:
        self.in_memory = False

    def __call__(self, response):
        dead = limiter._storage_dead
        if dead != self.in_memory:
            self.in_memory = dead
            if dead:
                log.warning(
                    "the rate limits' storage (RATELIMIT_STORAGE_URI, or REPLY_QUEUE's Redis) is unreachable: "
                    "this process counts limits in its own memory, not shared, until it answers again"
                )
            else:
                log.warning("the rate limits' storage answers again: limits are shared again")
        return response


def _limits_beyond_decorators() -> bool:
    """Whether any limit needs Flask-Limiter's before_request hook (e.g. RATELIMIT_DEFAULT).

    Reads some of Flask-Limiter's private attributes: if a new version renames them,
    this fails at app creation rather than silently dropping a limit.
    """
    manager = limiter.limit_manager
    return bool(
        manager.application_limits
        or manager.default_limits
        or manager._blueprint_limits
        or limiter._meta_limits
        or limiter._in_memory_fallback
    )
