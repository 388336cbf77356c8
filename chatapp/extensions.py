"""Every Flask extension object, created unbound; create_app binds each to an app (init_app).

Models subclass ``Base`` and reach the session registry through ``db``; the modules that
configure an extension for chatapp are ``chatapp.db`` (db, migrate), ``chatapp.rate_limits``
(limiter), ``chatapp.api`` (api) and ``chatapp.auth.login_sessions`` (login_manager).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_migrate import Migrate
from flask_smorest import Api
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
# Inside the package, so that an installed wheel can migrate its database.
MIGRATIONS_DIR = str(Path(__file__).resolve().parent / "migrations")


class Base(DeclarativeBase):
    """Plain declarative base; Flask-SQLAlchemy 3.1 breaks with MappedAsDataclass on SQLAlchemy 2.1."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


# expire_on_commit=False: a view that commits can still render what it just wrote
# without reopening a transaction to reload it.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
# The models' base class, db.Model: Flask-SQLAlchemy makes it at run time from Base, so a
# type checker sees Base.
if TYPE_CHECKING:
    Model = Base
else:
    Model = db.Model
migrate = Migrate(directory=MIGRATIONS_DIR, render_as_batch=True, compare_type=True)
login_manager = LoginManager()
csrf = CSRFProtect()
# Keyed by the client address (as ProxyFix sets it behind a trusted proxy) unless a limit
# names another key; see chatapp.rate_limits.
limiter = Limiter(key_func=get_remote_address)
# The JSON API's OpenAPI document and blueprints; see chatapp.api.
api = Api()


@login_manager.user_loader
def load_user(login_token: str):
    """The logged-in browser user: the cookie names a login session, read with its user in one query.

    Flask-Login also calls this for its remember-me cookie, which holds the same token
    (get_id()), so that cookie ends with its login session too.
    """
    from chatapp.auth import login_sessions

    return login_sessions.load_user(login_token)
