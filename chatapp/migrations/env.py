import contextlib
import logging
import warnings
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context
from flask import current_app

# SQLite's reflection cannot read an index on an expression (users' lower(username)); batch
# migrations reflect the tables they rebuild, and the tables those refer to. The index is
# created and dropped by its own migration, so the warning says nothing about the schema.
warnings.filterwarnings(
    "ignore", message="Skipped unsupported reflection of expression-based index", category=sa.exc.SAWarning
)

# this is the Alembic Config object, which provides
# access to the values within the .ini file in use.
config = context.config

# Configure logging from alembic.ini only when nothing else has (the CLI), and
# never disable the app's own loggers, which fileConfig does by default.
if not logging.getLogger().handlers:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
logger = logging.getLogger("alembic.env")


def get_engine():
    return current_app.extensions["migrate"].db.engine


def get_engine_url():
    return get_engine().url.render_as_string(hide_password=False).replace("%", "%%")


# add your model's MetaData object here
# for 'autogenerate' support
# from myapp import mymodel
# target_metadata = mymodel.Base.metadata
config.set_main_option("sqlalchemy.url", get_engine_url())
target_db = current_app.extensions["migrate"].db

# other values from the config, defined by the needs of env.py,
# can be acquired:
# my_important_option = config.get_main_option("my_important_option")
# ... etc.


def get_metadata():
    if hasattr(target_db, "metadatas"):
        return target_db.metadatas[None]
    return target_db.metadata


def run_migrations_offline():
    """Run migrations in 'offline' mode.

    This configures the context with just a URL
    and not an Engine, though an Engine is acceptable
    here as well.  By skipping the Engine creation
    we don't even need a DBAPI to be available.

    Calls to context.execute() here emit the given string to the
    script output.

    """
    url = config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=get_metadata(), literal_binds=True)

    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    """Run migrations in 'online' mode.

    In this scenario we need to create an Engine
    and associate a connection with the context.

    """

    # this callback is used to prevent an auto-migration from being generated
    # when there are no changes to the schema
    # reference: http://alembic.zzzcomputing.com/en/latest/cookbook.html
    def process_revision_directives(context, revision, directives):
        if getattr(config.cmd_opts, "autogenerate", False):
            script = directives[0]
            if script.upgrade_ops.is_empty():
                directives[:] = []
                logger.info("No changes in schema detected.")

    conf_args = current_app.extensions["migrate"].configure_args
    if conf_args.get("process_revision_directives") is None:
        conf_args["process_revision_directives"] = process_revision_directives

    connectable = get_engine()

    with connectable.connect() as connection, _sqlite_foreign_keys_off(connection):
        context.configure(connection=connection, target_metadata=get_metadata(), **conf_args)

        with context.begin_transaction():
            context.run_migrations()


@contextlib.contextmanager
def _sqlite_foreign_keys_off(connection):
    """Foreign keys off on SQLite while migrations run, checked before they go back on.

    SQLite changes most of a table (a column dropped, a foreign key added) by copying it to a
    new table and dropping the old one; with foreign keys on, dropping the old table would
    delete every row that refers to it (ON DELETE CASCADE): a change to conversations would
    empty messages. Alembic's batch mode documents this switch. The pragma is a no-op inside
    a transaction, so it is set before the migrations' transaction begins.
    """
    if connection.dialect.name != "sqlite":
        yield
        return
    # Straight to the driver (in autocommit, chatapp.db.sqlite): through SQLAlchemy, the
    # statement would first BEGIN a transaction, inside which the pragma does nothing.
    driver = connection.connection.driver_connection
    driver.execute("PRAGMA foreign_keys = OFF")
    try:
        yield
        problems = driver.execute("PRAGMA foreign_key_check").fetchall()
        if problems:
            raise RuntimeError(f"the migrations left rows whose foreign keys match nothing: {problems[:10]}")
    finally:
        restored = "ON" if current_app.config.get("SQLITE_FOREIGN_KEYS", True) else "OFF"
        driver.execute(f"PRAGMA foreign_keys = {restored}")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
