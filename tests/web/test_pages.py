"""Every page: no query while a template renders, no ORM object in a template, nothing a strict CSP blocks, styled errors."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import pytest
import sqlalchemy as sa
from flask import Blueprint, before_render_template, render_template_string, template_rendered
from sqlalchemy import event

from chatapp.chat.models import Message
from chatapp.db import db
from tests.web.conftest import csp_problems, seed_reply

probe = Blueprint("render_probe", __name__)


@probe.get("/probe/lazy-template")
def lazy_template():
    """A deliberately wrong view: hands the template an ORM object with an unloaded relationship."""
    message = db.session.scalar(sa.select(Message).limit(1))
    return render_template_string("{{ message.conversation.title }}", message=message)


@probe.get("/probe/crash")
def crash():
    """Fails with a detail that must not reach the browser."""
    raise RuntimeError("secret internal detail")


@contextlib.contextmanager
def watch_rendering(app):
    """Record SQL run on a thread while it renders a template, and every template's context."""
    rendering: dict[int, int] = {}
    seen = {"during": [], "outside": [], "contexts": []}

    def started(sender, template, context, **extra):
        rendering[threading.get_ident()] = rendering.get(threading.get_ident(), 0) + 1
        seen["contexts"].append((template.name, dict(context)))

    def finished(sender, template, context, **extra):
        rendering[threading.get_ident()] -= 1

    def executed(conn, cursor, statement, parameters, context, executemany):
        # Reply threads run their own SQL at any time; only the rendering thread counts.
        key = "during" if rendering.get(threading.get_ident()) else "outside"
        seen[key].append(statement)

    with app.app_context():
        engine = db.engine
    before_render_template.connect(started, app)
    template_rendered.connect(finished, app)
    event.listen(engine, "before_cursor_execute", executed)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", executed)
        before_render_template.disconnect(started, app)
        template_rendered.disconnect(finished, app)


def orm_objects(value, path="") -> list[str]:
    """Paths to mapped instances inside plain containers and dataclasses."""
    if hasattr(type(value), "__mapper__"):
        return [path or repr(value)]
    found = []
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            found += orm_objects(getattr(value, field.name), f"{path}.{field.name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            found += orm_objects(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple, set)):
        for index, item in enumerate(value):
            found += orm_objects(item, f"{path}[{index}]")
    return found


@pytest.fixture
def probed_app(app):
    app.register_blueprint(probe)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    return app


def visit_every_page(client, app, web) -> dict[str, str]:
    """Each page of the UI, in the states that matter; returns path -> HTML."""
    pages = {}

    def get(path, expected=200, method="get", **kwargs):
        response = getattr(client, method)(path, **kwargs)
        assert response.status_code == expected, (path, response.status_code)
        pages[f"{method.upper()} {path}"] = response.get_data(as_text=True)

    get("/login")
    get("/register")
    web.register("alice")
    get("/")
    done_id, done_reply = seed_reply(app, "alice", "<b>q</b>", "# A\n\n- x\n\n```\ncode\n```")
    failed_id, _ = seed_reply(app, "alice", "q", "partial", error="model down")
    pending_id, _ = seed_reply(app, "alice", "q", "", finish=False)
    for conversation_id in (done_id, failed_id, pending_id):
        get(f"/c/{conversation_id}")
    get(f"/c/{done_id}/delete")
    get(f"/c/{done_id}/messages/{done_reply}")
    get(f"/c/{done_id}/rename", 422, method="post", data={"title": " "})
    get(f"/c/{done_id}/messages", 422, method="post", data={"content": " "})
    get("/settings")
    get("/settings/tokens", 201, method="post", data={"name": "laptop"})
    get("/no/such/page", 404)
    get("/probe/crash", 500)
    return pages


def test_no_template_queries_or_sees_orm_objects(client, probed_app, web):
    with watch_rendering(probed_app) as seen:
        pages = visit_every_page(client, probed_app, web)
    assert len(seen["contexts"]) >= len(pages)
    assert seen["outside"], "the views ran no SQL at all: the watcher is not attached"
    assert seen["during"] == []
    for name, context in seen["contexts"]:
        context.pop("current_user")  # Flask-Login loads it before rendering starts
        assert orm_objects(context) == [], name


def test_the_watch_catches_a_lazy_load_in_a_template(client, probed_app, web):
    # The same checks, against a view that breaks the rule: they must fail it.
    web.register("alice")
    seed_reply(probed_app, "alice", "q", "a", title="lazy")
    with watch_rendering(probed_app) as seen:
        response = client.get("/probe/lazy-template")
    assert response.get_data(as_text=True) == "lazy"
    assert any("conversations" in statement for statement in seen["during"])
    ((_name, context),) = seen["contexts"]
    context.pop("current_user")
    assert orm_objects(context) == ["['message']"]


def test_pages_have_nothing_a_strict_csp_blocks(client, probed_app, web):
    pages = visit_every_page(client, probed_app, web)
    for name, html in pages.items():
        assert csp_problems(html) == [], name
    assert csp_problems('<p style="x" onclick="y">') == ["style attribute on <p>", "onclick handler on <p>"]
    assert csp_problems("<script>alert(1)</script>") == ["inline <script>", "script body"]


def test_error_pages_are_styled_html_and_json_under_api(client, probed_app):
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and missing.mimetype == "text/html"
    html = missing.get_data(as_text=True)
    assert '<link rel="stylesheet" href="/static/app.css">' in html
    assert "Page not found" in html and 'href="/"' in html

    crash = client.get("/probe/crash")
    assert crash.status_code == 500 and crash.mimetype == "text/html"
    html = crash.get_data(as_text=True)
    assert "Something went wrong" in html
    assert "secret internal detail" not in html and "Traceback" not in html

    method = client.get("/logout")
    assert method.status_code == 405 and "Method GET is not allowed here" in method.get_data(as_text=True)

    api = client.get("/api/v1/no/such/thing")
    assert api.status_code == 404
    assert api.get_json() == {"error": {"code": "not_found", "message": "no such resource; check the URL"}}


def test_static_files_are_served(client):
    script = client.get("/static/app.js")
    assert script.status_code == 200 and script.mimetype == "text/javascript"
    script.close()
    style = client.get("/static/app.css")
    assert style.status_code == 200 and style.mimetype == "text/css"
    style.close()
