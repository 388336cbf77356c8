"""The settings page: API tokens, created (shown once) and revoked after a confirmation; browser
login sessions, ended; the password, changed; the account, deleted after a confirmation."""

from __future__ import annotations

from flask import flash, redirect, url_for
from flask_login import current_user, login_required

from chatapp import rate_limits
from chatapp.auth import login_sessions
from chatapp.auth import services as auth
from chatapp.db import begin_write, db, transaction
from chatapp.errors import NotFound
from chatapp.web import bp, pages
from chatapp.web.accounts import log_out
from chatapp.web.forms import DeleteAccountForm, PasswordChangeForm, TokenForm


def _render_settings(
    form: TokenForm,
    new_token: str | None = None,
    status: int = 200,
    password_form: PasswordChangeForm | None = None,
):
    return pages.render_page(
        "settings.html",
        form=form,
        password_form=password_form or PasswordChangeForm(formdata=None),
        new_token=new_token,
        tokens=pages.tokens(current_user.id),
        browser_sessions=pages.login_sessions(current_user.id, login_sessions.current_session_id()),
        sidebar=pages.current_sidebar(),
    ), status


@bp.get("/settings")
@login_required
@transaction("read")
def settings():
    """Your API tokens and the browsers logged in to your account."""
    return _render_settings(TokenForm(formdata=None))


@bp.post("/settings/tokens")
@login_required
@transaction("write-after")
def create_token():
    """Create an API token and show it, once."""
    form = TokenForm()
    if not form.validate_on_submit():
        return _render_settings(form, status=422)
    begin_write()
    _row, token = auth.create_token(current_user.id, name=form.name.data.strip() or "web")
    db.session.commit()
    # Rendered, not flashed: the session cookie is signed but readable, no place for a secret.
    body, status = _render_settings(TokenForm(formdata=None), new_token=token, status=201)
    return body, status, {"Cache-Control": "no-store"}


@bp.get("/settings/tokens/<int:token_id>/revoke")
@login_required
@transaction("read")
def confirm_revoke_token(token_id: int):
    """Ask before revoking one of your API tokens."""
    row = auth.find_user_token(current_user.id, token_id)
    if row is None or row.revoked_at is not None:
        raise NotFound("token not found", code="token_not_found")
    token = pages.TokenItem(row.id, row.name, row.prefix, row.created_at, row.last_used_at)
    return pages.render_page("settings/revoke_token.html", token=token, sidebar=pages.current_sidebar())


@bp.post("/settings/tokens/<int:token_id>/revoke")
@login_required
@transaction("write")
def revoke_token(token_id: int):
    """Revoke one of your API tokens."""
    row = auth.find_user_token(current_user.id, token_id)
    if row is None:
        raise NotFound("token not found", code="token_not_found")
    auth.revoke_token(row)
    db.session.commit()
    flash(f"Token {row.prefix}… revoked.", "success")
    return redirect(url_for("web.settings"))


@bp.post("/settings/sessions/<int:session_id>/end")
@login_required
@transaction("write")
def end_login_session(session_id: int):
    """Log one of your browsers out (this one too, if it is this one)."""
    if not login_sessions.end(current_user.id, session_id):
        raise NotFound("browser session not found", code="session_not_found")
    db.session.commit()
    if session_id == login_sessions.current_session_id():
        log_out()
        flash("You are logged out.", "info")
        return redirect(url_for("web.login"))
    flash("That browser is logged out.", "success")
    return redirect(url_for("web.settings"))


@bp.post("/settings/sessions/end-all")
@login_required
@transaction("write")
def end_all_login_sessions():
    """Log out everywhere: end every browser login of your account, this one included."""
    ended = login_sessions.end_other_sessions(current_user.id, keep=None)
    db.session.commit()
    log_out()
    browsers = "1 browser was" if ended == 1 else f"{ended} browsers were"
    flash(
        f"You are logged out everywhere: {browsers} logged out. API tokens still work; "
        "revoke them in Settings after you log in.",
        "info",
    )
    return redirect(url_for("web.login"))


@bp.post("/settings/password")
@login_required
@rate_limits.password_checks
@transaction("write-after")
def change_password():
    """Change your password: your other browsers are logged out, and your API tokens revoked if asked."""
    form = PasswordChangeForm()
    if not form.validate_on_submit():
        return _render_settings(TokenForm(formdata=None), password_form=form, status=422)
    # current_user was read by authentication, whose read has ended: nothing is held while
    # the password is checked and the new one hashed (both slow on purpose).
    user_id, old_hash = current_user.id, current_user.password_hash
    if not auth.password_matches(current_user._get_current_object(), form.current_password.data):
        form.current_password.errors = ["Wrong password: your password was not changed."]
        return _render_settings(TokenForm(formdata=None), password_form=form, status=403)
    new_hash = auth.hash_password(form.new_password.data)
    begin_write()
    ended = auth.set_password(
        user_id,
        old_hash,
        new_hash,
        keep_session=login_sessions.current_session_id(),
        revoke_tokens=form.revoke_tokens.data,
    )
    if ended is None:
        db.session.rollback()
        form.current_password.errors = ["Your password was changed meanwhile (in another browser?); try again."]
        return _render_settings(TokenForm(formdata=None), password_form=form, status=409)
    db.session.commit()
    browsers = "1 other browser was" if ended == 1 else f"{ended} other browsers were"
    tokens = " Your API tokens are revoked." if form.revoke_tokens.data else ""
    flash(f"Your password is changed; {browsers} logged out.{tokens}", "success")
    return redirect(url_for("web.settings"))


@bp.get("/settings/delete-account")
@login_required
@transaction("read")
def confirm_delete_account():
    """Ask for your password before deleting your account."""
    return pages.render_page(
        "settings/delete_account.html", form=DeleteAccountForm(formdata=None), sidebar=pages.current_sidebar()
    )


@bp.post("/settings/delete-account")
@login_required
@rate_limits.password_checks
@transaction("write-after")
def delete_account():
    """Delete your account and all its data, then log out."""
    form = DeleteAccountForm()
    status = 422
    if form.validate_on_submit():
        if auth.password_matches(current_user._get_current_object(), form.delete_password.data):
            begin_write()
            auth.delete_user(current_user.id)
            db.session.commit()
            log_out()
            flash("Your account and all its data are deleted.", "info")
            return redirect(url_for("web.login"))
        form.delete_password.errors = ["Wrong password: your account was not deleted."]
        status = 403
    sidebar = pages.current_sidebar()
    return pages.render_page("settings/delete_account.html", form=form, sidebar=sidebar), status
