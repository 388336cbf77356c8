"""Schema management with Flask-Migrate; the migration scripts live in chatapp/migrations."""

from __future__ import annotations

import flask_migrate
import sqlalchemy as sa
from flask import Flask

from chatapp.extensions import MIGRATIONS_DIR, db, migrate


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
