"""Accounts and tokens: POST /users, POST /tokens, DELETE /tokens/current, DELETE /login-sessions."""

from flask import current_app, g

from chatapp import rate_limits
from chatapp.api.auth import authenticated
from chatapp.api.blueprint import api_blueprint
from chatapp.api.docs import error_responses
from chatapp.api.schemas import Credentials, LoginSessionsEnded, TokenOut, TokenRequest, UserOut
from chatapp.auth import login_sessions
from chatapp.auth import services as auth
from chatapp.db import begin_write, db, transaction
from chatapp.errors import Forbidden, Unauthorized

# Registering and creating a token need no credentials; the other two authenticate per view.
blp = api_blueprint("accounts", "Accounts and API tokens", authenticated=False)


@blp.post("/users")
@rate_limits.registration
@blp.arguments(Credentials)
@blp.response(201, UserOut)
@error_responses(blp, 400, 403, 409, 413, 415, 422, 429, 503, authenticated=False)
@transaction("write-after")
def register(body):
    """Create an account."""
    if not current_app.config["REGISTRATION_OPEN"]:
        raise Forbidden(
            "registration is closed on this server; ask its operator for an account", code="registration_closed"
        )
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
