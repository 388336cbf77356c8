# Copy this file to instance/config.py and edit it. instance/config.py is read
# after the built-in defaults and before CHATAPP_* environment variables, and is
# ignored by git so that secrets stay on the machine.

# Required (debug mode included), at least 32 bytes. Generate one with:
#   python -c 'import secrets; print(secrets.token_hex(32))'
# SECRET_KEY = "<the 64 hex digits it prints>"

# SQLite (the default) keeps its file in this folder. For PostgreSQL:
# SQLALCHEMY_DATABASE_URI = "postgresql+psycopg://chatapp@127.0.0.1:5432/chatapp"

# Pool sizing per worker process; see README "Deployment".
# SQLALCHEMY_ENGINE_OPTIONS = {"pool_size": 5, "max_overflow": 5, "pool_timeout": 5}

# Bot engine: "echo" (default) or "openai" (any OpenAI-compatible server).
# BOT_ENGINE = "openai"
# OPENAI_BASE_URL = "http://127.0.0.1:11434/v1"
# OPENAI_API_KEY = ""
# OPENAI_MODEL = "llama3.2"
