"""The database layer: one session registry (Flask-SQLAlchemy's ``db.session``) and how it is used.

- ``policy``: how each request's transaction begins and ends (``@transaction`` on every view);
- ``session``: how sessions end, the unit of work outside requests, how writers begin;
- ``engines``: binding ``db`` to an app, connect timeouts, transient errors, forks;
- ``sqlite``: SQLite's connection settings and this process's write gate;
- ``read_retry``: a read-only request run once more over a dropped connection;
- ``types``: column types; ``schema``: migrations.
"""

from chatapp.db.engines import dispose_engines_after_fork, init_app, is_transient
from chatapp.db.policy import end_transaction, transaction
from chatapp.db.session import begin_write, remove_session, unit_of_work
from chatapp.db.types import UTCDateTime, utcnow
from chatapp.extensions import Base, Model, db

__all__ = [
    "Base",
    "Model",
    "UTCDateTime",
    "begin_write",
    "db",
    "dispose_engines_after_fork",
    "end_transaction",
    "init_app",
    "is_transient",
    "remove_session",
    "transaction",
    "unit_of_work",
    "utcnow",
]
