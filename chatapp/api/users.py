"""Accounts and tokens: POST /users, POST /users/me/password, DELETE /users/me, POST /tokens,
DELETE /tokens/current, DELETE /login-sessions."""

from flask import current_app, g

from chatapp import rate_limits
from chatapp.api.auth import authenticated, current_user_id
from chatapp.api.blueprint import api_blueprint
from chatapp.api.docs import error_responses
from chatapp.api.schemas import (
    AccountDeletion,
    LoginSessionsEnded,
    PasswordChange,
    PasswordChanged,
    Registration,
    TokenOut,
    TokenRequest,
    UserOut,
)
from chatapp.auth import login_sessions
from chatapp.auth import services as auth
from chatapp.auth.models import User
from chatapp.db import begin_write, db, transaction
from chatapp.errors import Conflict, Forbidden, InvalidInput, Unauthorized

# Registering and creating a token need no credentials; the other two authenticate per view.
blp = api_blueprint("accounts", "Accounts and API tokens", authenticated=False)


@blp.post("/users")
@rate_limits.registration
@blp.arguments(Registration)
@blp.response(201, UserOut)
@error_responses(blp, 400, 403, 409, 413, 415, 422, 429, 503, authenticated=False)
@transaction("write-after")
def register(body):
    """Create an account (usernames are unique regardless of case; error.fields lists every problem)."""
    if not current_app.config["REGISTRATION_OPEN"]:
        raise Forbidden(
            "registration is closed on this server; ask its operator for an account", code="registration_closed"
        )
    problems, taken = auth.registration_problems(body["username"], body["password"])
    db.session.commit()  # end the read of whether the name is taken: hashing holds nothing
    if problems:
        field, (first, *_) = next(iter(problems.items()))
        if taken and list(problems) == ["username"]:  # the one problem: a conflict, as it always was
            raise Conflict(auth.taken_message(body["username"]), code="username_taken")
        # error.fields only when there are several problems: one alone keeps the usual shape
        many = sum(len(found) for found in problems.values()) > 1
        raise InvalidInput(f"field '{field}': {first}", field=field, fields=problems if many else None)
    user = auth.new_user(body["username"], body["password"])  # hashing: no connection held
    begin_write()
    auth.add_user(user)
    db.session.commit()
    return user


@blp.post("/tokens")
@rate_limits.tokens
@rate_limits.login_per_username
@blp.arguments(TokenRequest)
@blp.response(201, TokenOut)
@error_responses(blp, 400, 401, 413, 415, 422, 429, 503, authenticated=False)
@transaction("write-after")
def create_token(body):
    """Exchange a username and password for an API token (shown once)."""
    user = auth.find_login(body["username"])
    db.session.commit()  # end the read: no connection is held while the password is checked
    if not auth.password_matches(user, body["password"]):
        raise Unauthorized("wrong username or password", code="invalid_credentials")
    new_hash = auth.upgraded_password_hash(user, body["password"])  # hashing: no connection held
    begin_write()
    if new_hash is not None:
        auth.replace_password_hash(user.id, user.password_hash, new_hash)
    row, token = auth.create_token(user.id, name=body["name"])
    db.session.commit()
    return {"token": token, "id": row.id, "prefix": row.prefix, "name": row.name, "created_at": row.created_at}


@blp.delete("/tokens/current")
@blp.response(204)
@error_responses(blp, 401, 503)
@authenticated
@transaction("write")
def revoke_current_token():
    """Revoke the token this request was made with."""
    if g.api_token is None:
        raise Unauthorized("only a Bearer token can revoke itself", code="invalid_token")
    auth.revoke_token(g.api_token)
    db.session.commit()
    g.api_token = None
    return ""


@blp.delete("/login-sessions")
@blp.response(200, LoginSessionsEnded)
@error_responses(blp, 401, 503)
@authenticated
@transaction("write")
def end_login_sessions():
    """Log out every browser logged in to your account (API tokens keep working)."""
    ended = login_sessions.end_other_sessions(g.user_id, keep=None)
    db.session.commit()
    g.pop("login_session", None)  # a cookie caller's own session ended too: nothing to stamp
    return {"ended": ended}


def _user_to_check() -> User:
    """The caller's account, read to check its password; the read ends before the (slow) check."""
    user = db.session.get(User, current_user_id())
    db.session.commit()
    if user is None:  # deleted since the request authenticated
        raise Unauthorized("the account no longer exists", code="unauthorized")
    return user


@blp.post("/users/me/password")
@authenticated
@rate_limits.password_checks
@blp.arguments(PasswordChange)
@blp.response(200, PasswordChanged)
@error_responses(blp, 400, 401, 403, 409, 413, 415, 422, 429, 503)
@transaction("write-after")
def change_password(body):
    """Change your password: logs out your other browsers and, with revoke_tokens, revokes your API tokens."""
    user = _user_to_check()
    if not auth.password_matches(user, body["current_password"]):
        raise Forbidden("the current password is wrong", code="wrong_password", field="current_password")
    new_hash = auth.hash_password(body["new_password"])  # hashing: no connection held
    begin_write()
    credential = g.credential
    keep = credential.id if credential.kind == "login_session" else None
    ended = auth.set_password(
        user.id, user.password_hash, new_hash, keep_session=keep, revoke_tokens=body["revoke_tokens"]
    )
    if ended is None:
        raise Conflict("the password was changed meanwhile; try again", code="password_changed")
    db.session.commit()
    if body["revoke_tokens"]:
        g.api_token = None  # revoked: nothing to stamp
    return {"login_sessions_ended": ended, "tokens_revoked": body["revoke_tokens"]}


@blp.delete("/users/me")
@authenticated
@rate_limits.password_checks
@blp.arguments(AccountDeletion)
@blp.response(204)
@error_responses(blp, 400, 401, 403, 413, 415, 422, 429, 503)
@transaction("write-after")
def delete_account(body):
    """Delete your account and all its data (confirm with your password in the body); its tokens stop working."""
    user = _user_to_check()
    if not auth.password_matches(user, body["password"]):
        raise Forbidden("the password is wrong", code="wrong_password", field="password")
    begin_write()
    auth.delete_user(user.id)
    db.session.commit()
    g.api_token = None  # gone: nothing to stamp
    g.pop("login_session", None)
    return ""
