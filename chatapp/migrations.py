"""Schema management with Flask-Migrate; the migration scripts live in /migrations."""

from __future__ import annotations

from pathlib import Path

import flask_migrate
import sqlalchemy as sa
from flask import Flask

from chatapp.db import db

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")
migrate = flask_migrate.Migrate(directory=MIGRATIONS_DIR, render_as_batch=True, compare_type=True)


def init_app(app: Flask) -> None:
    import chatapp.models  # noqa: F401  (register every table on the metadata)

    migrate.init_app(app, db)


def upgrade_to_latest() -> None:
    """Create the schema or bring it to the newest migration; safe to repeat."""
    flask_migrate.upgrade(directory=MIGRATIONS_DIR)


def schema_is_current() -> bool:
    """True when the database is at the newest migration (one short read)."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.get_config(MIGRATIONS_DIR))
    with db.engine.connect() as connection:
        try:
            heads = set(MigrationContext.configure(connection).get_current_heads())
        except sa.exc.DBAPIError:
            return False
    return heads == set(script.get_heads())
