"""Register, log in, log out: each login is a row in login_sessions (chatapp.auth.login_sessions)."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import current_app, flash, g, redirect, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user

from chatapp import rate_limits
from chatapp.auth import login_sessions
from chatapp.auth import services as auth
from chatapp.auth.models import User
from chatapp.db import begin_write, db, transaction
from chatapp.errors import AppError
from chatapp.web import bp
from chatapp.web.forms import LoginForm, RegisterForm, add_error, sentence
from chatapp.web.pages import render_page


def _next_url() -> str:
    """Where to go after logging in: ``?next=`` if it stays on this site, else the chats.

    A target with control characters is dropped: a line break cannot go in the Location
    header (a 500), and browsers drop tabs and newlines from URLs, which can turn what
    looks like a path here into another site there.
    """
    target = request.args.get("next", "")
    if not target.isprintable():
        return url_for("web.index")
    parts = urlsplit(target)
    if target.startswith("/") and not target.startswith(("//", "/\\")) and not parts.netloc:
        return target
    return url_for("web.index")


def _log_in(user: User, target: str):
    """Log in a user whose login session (login_sessions.start) is committed; redirect to ``target``.

    The Flask session is cleared first: nothing planted in it before the login (a fixated
    value, the old CSRF token) survives into the logged-in session, and the cookie changes.
    ``target`` is worked out before, so where to go next is all that is kept.
    """
    session.clear()
    login_user(user)
    return redirect(target)


def log_out() -> None:
    """Forget the login in this browser: Flask-Login's keys, the CSRF token, everything."""
    logout_user()
    session.clear()
    g.pop("login_session", None)  # ended: nothing left for login_sessions.record_use to stamp


@bp.route("/register", methods=("GET", "POST"))
@rate_limits.registration
@transaction("write-after")
def register():
    """Create an account and log in to it."""
    if current_user.is_authenticated:
        return redirect(url_for("web.index"))
    if not current_app.config["REGISTRATION_OPEN"]:
        return render_page("auth/register.html", form=None), 403
    form = RegisterForm()
    status = 422
    if form.is_submitted():
        # Every problem at once: the form's own checks, and whether the name is taken (in
        # any case) when it is otherwise valid; that read ends before the password is hashed.
        valid = form.validate()
        name = form.username.data
        if not form.username.errors and isinstance(name, str) and name and auth.username_taken(name):
            form.username.errors = [sentence(auth.taken_message(name))]
            status = 409 if valid else 422  # taken alone is a conflict, as the API says
            valid = False
        db.session.commit()
        if valid:
            try:
                user = auth.new_user(form.username.data, form.password.data)  # no connection held
                begin_write()
                auth.add_user(user)
                login_sessions.start(user)
            except AppError as error:
                db.session.rollback()  # the form re-renders holding no write lock
                add_error(form, error, "username")
                status = error.status
            else:
                db.session.commit()
                response = _log_in(user, url_for("web.index"))
                flash(f"Welcome, {user.username}! Start a conversation.", "success")
                return response
    return render_page("auth/register.html", form=form), status if form.errors else 200


@bp.route("/login", methods=("GET", "POST"))
@rate_limits.login
@rate_limits.login_per_username
@transaction("write-after")
def login():
    """Log in with a username and password."""
    if current_user.is_authenticated:
        return redirect(_next_url())
    form = LoginForm()
    status = 422 if form.is_submitted() else 200
    if form.validate_on_submit():
        user = auth.find_login(form.username.data)
        db.session.commit()  # end the read: no connection is held while the password is checked
        if auth.password_matches(user, form.password.data):
            new_hash = auth.upgraded_password_hash(user, form.password.data)  # no connection held
            begin_write()
            if new_hash is not None:
                auth.replace_password_hash(user.id, user.password_hash, new_hash)
            login_sessions.start(user)
            db.session.commit()
            return _log_in(user, _next_url())
        form.form_errors.append("Wrong username or password.")
        status = 401
    return render_page("auth/login.html", form=form), status


def too_many_logins(error):
    """The login page again, saying to wait, for a login over its rate limit."""
    form = LoginForm()
    form.form_errors.append(f"Too many requests to log in (limit: {error.description}). Wait a minute, then try again.")
    return render_page("auth/login.html", form=form), 429


@bp.post("/logout")
@login_required
@transaction("write")
def logout():
    """Log out: end this browser's login session on the server and forget the cookie."""
    login_sessions.end(current_user.id, login_sessions.current_session_id())
    db.session.commit()
    log_out()
    flash("You are logged out.", "info")
    return redirect(url_for("web.login"))
