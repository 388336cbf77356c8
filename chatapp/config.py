"""Built-in configuration defaults and the start-up checks that guard them."""

import sys

from chatapp.green import gevent_patched

DEFAULT_SECRET_KEY = "dev"

# What a username may hold (its length is USERNAME_MIN_LENGTH..USERNAME_MAX_LENGTH): a regular
# expression character class, and the same in words. Not a setting: existing names must stay valid.
USERNAME_CHARACTERS = "A-Za-z0-9_.-"
USERNAME_CHARACTERS_RULE = "letters, digits, '_', '.' or '-'"
# Sanity bounds on what a login form or POST /tokens reads (not rules for new accounts: a
# password set under a larger PASSWORD_MAX_LENGTH must still log in).
LOGIN_USERNAME_MAX_LENGTH = 200
LOGIN_PASSWORD_MAX_LENGTH = 1000
# The widest value each limit may take: the database column's size.
COLUMN_LENGTHS = {"USERNAME_MAX_LENGTH": 40, "TITLE_MAX_LENGTH": 200, "TOKEN_NAME_MAX_LENGTH": 100}


class Defaults:
    """Values used unless instance/config.py, CHATAPP_* variables or test_config override them."""

    SECRET_KEY = DEFAULT_SECRET_KEY
    # A relative SQLite path is placed in the instance folder by Flask-SQLAlchemy.
    SQLALCHEMY_DATABASE_URI = "sqlite:///chatapp.sqlite"
    SQLALCHEMY_ENGINE_OPTIONS = {
        # Pre-ping replaces pooled PostgreSQL connections that died while idle (database
        # restart); SQLite engines skip it (a file connection cannot drop while idle).
        "pool_pre_ping": True,
        # Waiting 30 s (SQLAlchemy's default) for a connection turns an overload
        # into a hang; a few seconds and a 503 lets clients retry elsewhere.
        "pool_timeout": 5,
    }
    # PostgreSQL (psycopg): seconds to wait for a new connection, below pool_timeout, so
    # an unreachable database answers 503 rather than hanging (libpq's minimum is 2).
    DATABASE_CONNECT_TIMEOUT = 3
    # What stands between chatapp and PostgreSQL: "" (nothing, or a pooler in session mode)
    # or "pgbouncer" (PgBouncer in transaction pooling mode, where consecutive transactions
    # of one connection may run on different server connections, so nothing may be
    # prepared on the server; see docs/deployment.md, "Connection budget").
    DATABASE_POOLER = ""
    # SQLite connection settings, applied to every new connection.
    SQLITE_JOURNAL_MODE = "WAL"
    # How long a writer waits for this process's write gate, and then for SQLite's write lock.
    SQLITE_BUSY_TIMEOUT_MS = 10_000
    SQLITE_FOREIGN_KEYS = True
    SQLITE_SYNCHRONOUS = "NORMAL"

    MAX_CONTENT_LENGTH = 1024 * 1024
    # Input limits, checked alike by the API, the web forms and the services (chatapp.inputs).
    # Lowering one leaves existing data as it is; the maxima of usernames, titles and token
    # names cannot go past their columns' sizes (start-up refuses it).
    USERNAME_MIN_LENGTH = 3
    USERNAME_MAX_LENGTH = 40
    PASSWORD_MIN_LENGTH = 8
    PASSWORD_MAX_LENGTH = 200
    TITLE_MAX_LENGTH = 200
    # At most BOT_HISTORY_MAX_CHARS, so that the message a reply answers always fits.
    MESSAGE_MAX_LENGTH = 32_000
    TOKEN_NAME_MAX_LENGTH = 100
    # A conversation's system prompt (sent before its history, and always kept in it).
    SYSTEM_PROMPT_MAX_LENGTH = 8_000
    # Werkzeug's method and parameters for new hashes: scrypt with n=2**17 (Werkzeug's
    # default is 2**15), r=8, p=1, which needs 128 MiB for each hash. A login whose stored
    # hash used another method stores a new hash made with this one.
    PASSWORD_HASH_METHOD = "scrypt:131072:8:1"
    # Password hashes computed at once per process; more logins wait (holding no database
    # connection), so a burst cannot take 128 MiB per login.
    PASSWORD_HASH_CONCURRENCY = 2
    REGISTRATION_OPEN = True

    # The browser's login cookie: never readable by scripts, not sent on cross-site
    # POSTs; set SESSION_COOKIE_SECURE = True when the site is served over HTTPS.
    SESSION_COOKIE_HTTPONLY = True
    SESSION_COOKIE_SAMESITE = "Lax"
    SESSION_COOKIE_SECURE = False
    # CSRF tokens live as long as the login session: a chat tab left open for hours
    # must still be able to send (Flask-WTF's default expires them after an hour).
    WTF_CSRF_TIME_LIMIT = None
    WEB_CONVERSATIONS_PER_PAGE = 30
    WEB_MESSAGES_PER_PAGE = 100

    BOT_ENGINE = "echo"
    BOT_ECHO_DELAY = 0.0
    OPENAI_BASE_URL = "http://127.0.0.1:11434/v1"
    OPENAI_API_KEY = ""
    OPENAI_MODEL = "llama3.2"
    OPENAI_CONNECT_TIMEOUT = 5.0
    OPENAI_READ_TIMEOUT = 60.0
    OPENAI_SYSTEM_PROMPT = ""
    # The engine's model list (GET /v1/models) is cached this long per process.
    MODELS_CACHE_SECONDS = 60.0
    # After a conversation's first reply, a background job asks the engine for a title
    # (a separate, non-streamed request with this prompt, given up after TITLE_TIMEOUT s).
    TITLES_ENABLED = True
    TITLE_PROMPT = ""
    TITLE_TIMEOUT = 20.0
    # Characters of a conversation's history sent to the bot with each reply (a simple
    # stand-in for the model's token window): the newest messages that fit, and always the
    # user message being answered. The system prompt is not counted.
    BOT_HISTORY_MAX_CHARS = 100_000

    # Reply threads (greenlets under gevent) wait on the bot holding no connection, so they
    # are cheap; the database pool, not this number, bounds database concurrency. It does
    # bound the replies running at once per process, hence the bot's load.
    REPLY_WORKERS = 64
    # Replies that may wait for a free reply thread; beyond that, posting a message or
    # regenerating answers 503 (Retry-After) and stores nothing.
    REPLY_QUEUE_MAX = 256
    # Each write costs a short transaction; streams see new text this often.
    REPLY_FLUSH_INTERVAL = 0.25
    # Leases (chatapp/chat/leases.py): a reply's process renews its lease this often, and
    # a lease not renewed for REPLY_LEASE_SECONDS is taken over by another process, found
    # by its sweep within REPLY_SWEEP_INTERVAL. After a crash a conversation is answering
    # again within about lease + sweep seconds (plus the bot's own time).
    REPLY_LEASE_SECONDS = 10.0
    REPLY_LEASE_RENEW_SECONDS = 3.0
    REPLY_SWEEP_INTERVAL = 2.0
    # How often a process checks that it still holds the replies it runs: a reply stopped
    # from any worker or host ends, and its bot request is closed, within this long.
    REPLY_STOP_CHECK_SECONDS = 0.5
    # Runs of one reply (an interrupted run counts, a handed-over one does not) before it
    # is failed with an error saying why, rather than crash-looping.
    REPLY_MAX_RUNS = 3
    # A worker shutting down lets its replies finish this long, then hands the rest over;
    # gunicorn.conf.py caps it at graceful_timeout minus a margin.
    REPLY_HANDOVER_SECONDS = 25.0
    # A reply's writes retry through a database outage this long; past the lease, another
    # process has taken the reply over anyway.
    REPLY_WRITE_RETRY_SECONDS = 60.0
    # Replies on a job queue (README, "Replies on a job queue"): with a Redis URL here, web
    # processes only enqueue reply ids and Celery workers (chatapp.jobs) run the replies.
    REPLY_QUEUE = ""
    REPLY_QUEUE_NAME = "chatapp.replies"
    # Connect and socket timeout of every Redis call a web request makes: a dead Redis
    # answers 503 in about this long, never hangs a request.
    REPLY_QUEUE_TIMEOUT = 1.0
    # Redis hands an unacknowledged job (its worker died) out again after this long; a
    # duplicate delivery does nothing (the lease claim), and the sweep recovers sooner.
    REPLY_QUEUE_VISIBILITY_TIMEOUT = 3600.0
    # A Celery worker serves its own /metrics on this port (0: none), see docs/deployment.md.
    QUEUE_WORKER_METRICS_PORT = 0
    # Streams told of new text through Redis pub/sub (README, "Streams across processes"):
    # a Redis URL here, or in queue mode REPLY_QUEUE's by default ("off": none). Without
    # it a stream whose reply runs in another process polls every STREAM_POLL_INTERVAL.
    REPLY_EVENTS = ""
    STREAM_POLL_INTERVAL = 0.2
    # While its reply runs in this process a stream still reads the database this often (a
    # change made elsewhere; a revoked credential), and so does one waiting for Redis notices
    # (a missed notice): one read per open stream per period. None: 5 s for both.
    # Thousands of streams per worker (gevent) may want 15-30 s.
    STREAM_RECHECK_SECONDS = None
    STREAM_MAX_SECONDS = 3600.0
    # An open stream holds one of a gunicorn worker's threads (gthread) or one of its
    # worker_connections (gevent): one user may hold this many at once in one worker
    # process; the next gets 429 until one ends.
    STREAMS_PER_USER = 10

    # Operations (docs/deployment.md). With METRICS_TOKEN set, /metrics needs
    # "Authorization: Bearer <METRICS_TOKEN>"; without it, /metrics answers only requests
    # from loopback that came through no proxy (403 otherwise), unless METRICS_PUBLIC opens
    # it to everyone. METRICS_ENABLED = False hides it (404).
    METRICS_ENABLED = True
    METRICS_TOKEN = ""
    METRICS_PUBLIC = False
    # A database connection held longer than this logs a warning naming the route or job.
    HOLD_WARN_SECONDS = 1.0
    # Flask-Limiter. Per client address; behind a proxy set PROXY_FIX_X_FOR so that
    # the address is the client's, not the proxy's. Where counts live: "" (the default)
    # is this process's memory, or in queue mode REPLY_QUEUE's Redis, shared by every
    # host; set RATELIMIT_STORAGE_URI = "redis://host:6379/n" to choose (docs/deployment.md).
    RATELIMIT_ENABLED = True
    RATELIMIT_STORAGE_URI = ""
    RATELIMIT_HEADERS_ENABLED = True
    # A moving window counts the requests of the last minute (or hour) exactly; a fixed
    # window would let a client send twice its limit across a window's edge, and its count
    # restarting on the minute would let through a request a limit has just refused.
    RATELIMIT_STRATEGY = "moving-window"
    # If Redis is unreachable, count in this process's memory meanwhile rather than fail requests.
    RATELIMIT_IN_MEMORY_FALLBACK_ENABLED = True
    RATELIMIT_TOKENS = "10 per minute;100 per hour"
    RATELIMIT_REGISTER = "5 per minute;50 per hour"
    RATELIMIT_LOGIN = "10 per minute;100 per hour"
    # Per user (API and browser share one count), on the work that costs: a message starts
    # a bot reply, as does a regeneration. A person chatting sends a few a minute; these
    # leave room for a script too, but not for one user taking the bot for everyone.
    RATELIMIT_MESSAGES = "20 per minute;600 per hour"
    RATELIMIT_REGENERATE = "10 per minute;300 per hour"
    RATELIMIT_CONVERSATIONS = "20 per minute;600 per hour"
    # Per username, whichever address it comes from, shared by the login form and
    # POST /api/v1/tokens: guesses spread over many addresses still meet a limit.
    RATELIMIT_LOGIN_USERNAME = "10 per minute;100 per hour"
    # Number of proxies in front of the app that set X-Forwarded-For/-Proto (1 behind nginx).
    PROXY_FIX_X_FOR = 0
    PROXY_FIX_X_PROTO = 0
    # Strict-Transport-Security max-age; only set it when the site is served over HTTPS.
    HSTS_SECONDS = 0


class ConfigError(RuntimeError):
    """Raised at start-up when the configuration cannot run safely."""


# Flask signs login cookies and CSRF tokens with SECRET_KEY: 32 random bytes (what
# secrets.token_hex(32) gives, and more) cannot be guessed; a short or shared key can.
MIN_SECRET_KEY_BYTES = 32
_HOW_TO_SET_SECRET_KEY = (
    "Set one before starting, either in instance/config.py (SECRET_KEY = '...') or in the "
    "environment (export CHATAPP_SECRET_KEY=...). Generate one with: "
    "python -c 'import secrets; print(secrets.token_hex(32))'"
)


def check_secret_key(config) -> None:
    """Refuse to start with a missing, well-known or short SECRET_KEY; only tests are exempt.

    Debug mode is not: a debug server reachable by anyone else would otherwise sign its
    login cookies with a key everyone knows.
    """
    if config.get("TESTING"):
        return
    key = config.get("SECRET_KEY")
    if not key or key == DEFAULT_SECRET_KEY:
        raise ConfigError(f"chatapp: SECRET_KEY is missing or left at its default. {_HOW_TO_SET_SECRET_KEY}")
    if isinstance(key, str):
        size = len(key.encode("utf-8"))
    elif isinstance(key, bytes):
        size = len(key)
    else:
        # CHATAPP_* values are parsed as JSON: an all-digit key arrives as a number.
        raise ConfigError(
            f"chatapp: SECRET_KEY must be text, not {type(key).__name__} (in CHATAPP_SECRET_KEY, "
            f"put a key made only of digits in JSON quotes). {_HOW_TO_SET_SECRET_KEY}"
        )
    if size < MIN_SECRET_KEY_BYTES:
        raise ConfigError(
            f"chatapp: SECRET_KEY is {size} bytes long; it must be at least {MIN_SECRET_KEY_BYTES} "
            f"bytes of random text, or anyone could guess it and forge a login. {_HOW_TO_SET_SECRET_KEY}"
        )


def check_history_budget(config) -> None:
    """Refuse a history budget too small for the longest message a user may send."""
    longest = config.get("MESSAGE_MAX_LENGTH")
    budget = config.get("BOT_HISTORY_MAX_CHARS")
    if not _whole(budget) or _whole(longest) and budget < longest:
        raise ConfigError(
            f"chatapp: BOT_HISTORY_MAX_CHARS must be a whole number of at least {longest} "
            f"(MESSAGE_MAX_LENGTH, the longest message), so that the message a reply answers "
            f"always fits; got {budget!r}"
        )


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_input_limits(config) -> None:
    """Refuse input limits that are not whole numbers, a minimum above its maximum, or a
    maximum wider than the column that stores the value (storing it would fail)."""
    pairs = [("USERNAME_MIN_LENGTH", "USERNAME_MAX_LENGTH"), ("PASSWORD_MIN_LENGTH", "PASSWORD_MAX_LENGTH")]
    for low, high in pairs:
        minimum, maximum = config.get(low), config.get(high)
        if not _whole(minimum) or not _whole(maximum) or not 1 <= minimum <= maximum:
            raise ConfigError(
                f"chatapp: {low} and {high} must be whole numbers with 1 <= {low} <= {high}; "
                f"got {minimum!r} and {maximum!r}"
            )
    for name in (
        "USERNAME_MAX_LENGTH",
        "TITLE_MAX_LENGTH",
        "MESSAGE_MAX_LENGTH",
        "TOKEN_NAME_MAX_LENGTH",
        "SYSTEM_PROMPT_MAX_LENGTH",
    ):
        value = config.get(name)
        if not _whole(value) or value < 1:
            raise ConfigError(f"chatapp: {name} must be a whole number of at least 1; got {value!r}")
        column = COLUMN_LENGTHS.get(name)
        if column is not None and value > column:
            raise ConfigError(f"chatapp: {name} can be at most {column} (the database column's size); got {value!r}")


def check_stream_recheck(config) -> None:
    """Refuse a STREAM_RECHECK_SECONDS that is neither unset (None) nor a positive number."""
    value = config.get("STREAM_RECHECK_SECONDS")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(
            f"chatapp: STREAM_RECHECK_SECONDS must be a number of seconds above 0, or unset for 5 s; got {value!r}"
        )


def check_worker_model(config) -> None:
    """Under gevent, refuse SQLite, and a psycopg that would block the hub.

    Every greenlet of a gevent worker shares one OS thread, so any call that blocks in C
    stops them all. SQLite's busy handler sleeps in C while another writer holds the lock
    (up to SQLITE_BUSY_TIMEOUT_MS), and its file I/O is blocking: one writer waiting would
    freeze every open stream and request of the worker. psycopg (3.1.14 and later) waits
    cooperatively when gevent patched ``select`` before psycopg was imported; imported
    earlier, it keeps its C wait function, which blocks the hub for each query.
    """
    if not gevent_patched():
        return
    uri = str(config.get("SQLALCHEMY_DATABASE_URI") or "")
    if uri.startswith("sqlite"):
        raise ConfigError(
            "chatapp: the gevent worker needs PostgreSQL: with SQLite, one writer waiting for the "
            "database lock (or for the disk) would freeze every stream and request of the worker. "
            "Use the default gthread worker with SQLite (unset CHATAPP_WORKER_CLASS), or move to PostgreSQL."
        )
    waiting = sys.modules.get("psycopg.waiting")
    if waiting is not None and getattr(waiting, "wait", None) is getattr(waiting, "wait_c", object()):
        raise ConfigError(
            "chatapp: psycopg was imported before gevent patched the standard library, so every query "
            "would block the whole worker. Start gunicorn with -c gunicorn.conf.py, which patches first "
            "when CHATAPP_WORKER_CLASS=gevent (or -k gevent) is set."
        )
