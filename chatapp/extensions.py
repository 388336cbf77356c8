"""Extensions, created unbound and bound to an app in create_app."""

from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

login_manager = LoginManager()
csrf = CSRFProtect()


@login_manager.user_loader
def load_user(user_id: str):
    """The logged-in browser user, read in the request's own session."""
    from chatapp.auth.models import User
    from chatapp.db import db

    return db.session.get(User, int(user_id)) if user_id.isdigit() else None
