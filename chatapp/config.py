"""Built-in configuration defaults and the start-up checks that guard them."""

DEFAULT_SECRET_KEY = "dev"


class Defaults:
    """Values used unless instance/config.py, CHATAPP_* variables or test_config override them."""

    SECRET_KEY = DEFAULT_SECRET_KEY
    # A relative SQLite path is placed in the instance folder by Flask-SQLAlchemy.
    SQLALCHEMY_DATABASE_URI = "sqlite:///chatapp.sqlite"
    SQLALCHEMY_ENGINE_OPTIONS = {
        # Pre-ping replaces pooled connections that died while idle (database restart).
        "pool_pre_ping": True,
        # Waiting 30 s (SQLAlchemy's default) for a connection turns an overload
        # into a hang; a few seconds and a 503 lets clients retry elsewhere.
        "pool_timeout": 5,
    }
    # SQLite connection settings, applied to every new connection.
    SQLITE_JOURNAL_MODE = "WAL"
    SQLITE_BUSY_TIMEOUT_MS = 10_000
    SQLITE_FOREIGN_KEYS = True
    SQLITE_SYNCHRONOUS = "NORMAL"

    MAX_CONTENT_LENGTH = 1024 * 1024
    PASSWORD_MIN_LENGTH = 8
    PASSWORD_MAX_LENGTH = 200
    PASSWORD_HASH_METHOD = "scrypt"
    REGISTRATION_OPEN = True

    BOT_ENGINE = "echo"
    BOT_ECHO_DELAY = 0.0
    OPENAI_BASE_URL = "http://127.0.0.1:11434/v1"
    OPENAI_API_KEY = ""
    OPENAI_MODEL = "llama3.2"
    OPENAI_CONNECT_TIMEOUT = 5.0
    OPENAI_READ_TIMEOUT = 60.0
    OPENAI_SYSTEM_PROMPT = ""

    REPLY_WORKERS = 16
    REPLY_FLUSH_INTERVAL = 0.15
    REPLY_STALE_AFTER = 300.0
    REPLY_REAP_INTERVAL = 60.0
    STREAM_POLL_INTERVAL = 0.2
    STREAM_MAX_SECONDS = 3600.0


class ConfigError(RuntimeError):
    """Raised at start-up when the configuration cannot run safely."""


def check_secret_key(config) -> None:
    """Refuse to start a production app with a missing or well-known SECRET_KEY."""
    if config.get("DEBUG") or config.get("TESTING"):
        return
    key = config.get("SECRET_KEY")
    if not key or key == DEFAULT_SECRET_KEY:
        raise ConfigError(
            "chatapp: SECRET_KEY is missing or left at its default. Set one before starting, "
            "either in instance/config.py (SECRET_KEY = '...') or in the environment "
            "(export CHATAPP_SECRET_KEY=...). Generate one with: "
            "python -c 'import secrets; print(secrets.token_hex(32))'"
        )
