"""chatapp: a self-hostable chatbot web application whose database sessions are right by construction."""

from __future__ import annotations

import os

from flask import Config, Flask

from chatapp.config import (
    Defaults,
    check_history_budget,
    check_input_limits,
    check_secret_key,
    check_stream_recheck,
    check_worker_model,
)
from chatapp.flask_app import ChatFlask

__version__ = "0.1.0"


def _configured_app(test_config: dict | None = None) -> Flask:
    """An app holding its settings: defaults, then instance/config.py, CHATAPP_*, test_config."""
    app = ChatFlask(__name__, instance_relative_config=True)
    app.config.from_object(Defaults)
    app.config.from_pyfile("config.py", silent=True)
    app.config.from_prefixed_env("CHATAPP")
    if test_config is not None:
        app.config.from_mapping(test_config)
    return app


def load_config() -> Config:
    """The settings create_app would use, without the app (gunicorn.conf.py's start-up check)."""
    return _configured_app().config


def create_app(test_config: dict | None = None) -> Flask:
    """Create and configure an app; binds extensions, touches no database."""
    app = _configured_app(test_config)
    check_worker_model(app.config)
    check_secret_key(app.config)
    check_input_limits(app.config)
    check_history_budget(app.config)
    check_stream_recheck(app.config)
    # Owner-only when created here: it holds the secret key (config.py) and the SQLite file.
    os.makedirs(app.instance_path, mode=0o700, exist_ok=True)

    from chatapp import api, cli, db, health, inputs, ops, rate_limits, security
    from chatapp.chat import runner, sweeper
    from chatapp.db import policy, schema
    from chatapp.errors import handlers
    from chatapp.extensions import csrf, login_manager
    from chatapp.web import bp as web_bp

    inputs.init_app(app)
    db.init_app(app)
    ops.init_app(app)
    security.init_app(app)
    rate_limits.init_app(app)
    schema.init_app(app)
    login_manager.init_app(app)
    csrf.init_app(app)
    runner.init_app(app)
    sweeper.init_app(app)
    api.init_app(app)
    handlers.init_app(app)  # after api: its handlers replace flask-smorest's
    app.register_blueprint(health.bp)
    app.register_blueprint(web_bp)
    cli.init_app(app)
    # Every view says how its transaction begins (chatapp.db.policy); refuse one that does not.
    policy.check_views(app)
    return app
