"""Register, log in, log out."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user

from chatapp import limits
from chatapp.auth import services as auth
from chatapp.db import begin_write, db
from chatapp.errors import AppError
from chatapp.web import bp
from chatapp.web.forms import LoginForm, RegisterForm, add_error


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


@bp.route("/register", methods=("GET", "POST"))
@limits.registration
def register():
    """Create an account and log in to it."""
    if current_user.is_authenticated:
        return redirect(url_for("web.index"))
    if not current_app.config["REGISTRATION_OPEN"]:
        return render_template("auth/register.html", form=None), 403
    form = RegisterForm()
    status = 422
    if form.validate_on_submit():
        try:
            user = auth.new_user(form.username.data, form.password.data)  # no connection held
            begin_write()
            auth.add_user(user)
        except AppError as error:
            add_error(form, error, "username")
            status = error.status
        else:
            db.session.commit()
            login_user(user)
            flash(f"Welcome, {user.username}! Start a conversation.", "success")
            return redirect(url_for("web.index"))
    return render_template("auth/register.html", form=form), status if form.errors else 200


@bp.route("/login", methods=("GET", "POST"))
@limits.login
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
            login_user(user)
            return redirect(_next_url())
        form.form_errors.append("Wrong username or password.")
        status = 401
    return render_template("auth/login.html", form=form), status


@bp.post("/logout")
@login_required
def logout():
    """Log out and forget the login cookie."""
    logout_user()
    flash("You are logged out.", "info")
    return redirect(url_for("web.login"))
