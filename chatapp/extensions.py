"""Extensions, created unbound and bound to an app in create_app."""

from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

login_manager = LoginManager()
csrf = CSRFProtect()


@login_manager.user_loader
def load_user(login_token: str):
    """The logged-in browser user: the cookie names a login session, read with its user in one query.

    Flask-Login also calls this for its remember-me cookie, which holds the same token
    (get_id()), so that cookie ends with its login session too.
    """
    from chatapp.auth import login_sessions

    return login_sessions.load_user(login_token)
