"""chatapp's Flask class: Flask, minus two costs it pays on every request for nothing.

- ``ensure_sync``: Flask passes every before/after/teardown function and every view
  through it on every call, and flask-smorest every layer of a view's decorators: each an
  ``inspect.iscoroutinefunction`` check, 20-odd per API request. Whether a function is a
  coroutine function never changes, so a function found to be plain is remembered.
- The session cookie: Flask builds its signing serializer (an HMAC key derivation among
  other things) on every request before it looks for a cookie. A request without one
  (every API call with a Bearer token) gets its empty session without it, and an empty,
  untouched session is saved without working out the cookie's attributes first.
"""

from __future__ import annotations

from flask import Flask
from flask.sessions import SecureCookieSessionInterface

# Plain functions remembered per app; a bound on the set keeps a caller that passes a new
# function on every request (none does) from growing it without end.
_SYNC_CACHE_MAX = 4096


class CookieSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions; requests without a session cookie skip the serializer."""

    def open_session(self, app, request):
        # Flask: no secret key, no session (None); else no cookie, a new empty session.
        if app.secret_key and not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)

    def save_session(self, app, session, response) -> None:
        if not session and not session.modified:
            # What Flask does for an empty session nobody changed: nothing but Vary.
            if session.accessed:
                if "Vary" in response.headers:
                    response.vary.add("Cookie")
                else:  # what vary.add() writes, without parsing and re-dumping the header
                    response.headers["Vary"] = "Cookie"
            return
        super().save_session(app, session, response)


class ChatFlask(Flask):
    session_interface = CookieSessionInterface()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plain_functions: set = set()

    def ensure_sync(self, func):
        try:
            if func in self._plain_functions:
                return func
        except TypeError:  # unhashable: ask Flask every time
            return super().ensure_sync(func)
        result = super().ensure_sync(func)
        if result is func and len(self._plain_functions) < _SYNC_CACHE_MAX:
            self._plain_functions.add(func)
        return result
