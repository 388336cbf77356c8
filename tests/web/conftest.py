"""Browser-UI test helpers: a user who drives the web forms with the test client."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
import sqlalchemy as sa

from chatapp.auth import services as auth_services
from chatapp.chat import services as chat_services
from chatapp.db import unit_of_work
from tests.helpers import start_conversation

PASSWORD = "correct horse"


def csrf_from(html: str) -> str:
    """The CSRF token a page gives its forms and scripts (the <meta> tag)."""
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert match, "page has no csrf-token meta tag"
    return match.group(1)


def count(app, model, *where) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model).where(*where))


class WebUser:
    """Registers, logs in and starts conversations through the web forms."""

    def __init__(self, client):
        self.client = client

    def _token(self, path: str) -> str:
        return csrf_from(self.client.get(path).get_data(as_text=True))

    def register(self, username: str = "alice", password: str = PASSWORD):
        response = self.client.post(
            "/register",
            data={
                "username": username,
                "password": password,
                "confirm": password,
                "csrf_token": self._token("/register"),
            },
        )
        assert response.status_code == 302, response.get_data(as_text=True)
        return response

    def login(self, username: str = "alice", password: str = PASSWORD):
        response = self.client.post(
            "/login",
            data={
                "username": username,
                "password": password,
                "csrf_token": self._token("/login"),
            },
        )
        assert response.status_code == 302, response.get_data(as_text=True)
        return response

    def logout(self):
        return self.client.post("/logout", data={"csrf_token": self._token("/")})

    def new_conversation(self) -> int:
        return start_conversation(self.client)


@pytest.fixture
def web(client) -> WebUser:
    return WebUser(client)


def seed_reply(
    app,
    username: str,
    question: str,
    answer: str,
    *,
    error: str | None = None,
    finish: bool = True,
    title: str | None = None,
) -> tuple[int, int]:
    """A conversation with one exchange, written through the services; (conversation, reply) ids."""
    with unit_of_work(app):
        user = auth_services.find_user(username)
        conversation = chat_services.create_conversation(user.id, title)
        _message, reply = chat_services.post_message(conversation, question)
        if finish:
            chat_services.finish_reply(reply.id, reply.attempt, answer, error)
        return conversation.id, reply.id


class PageChecker(HTMLParser):
    """Collects what a Content-Security-Policy without 'unsafe-inline' would block."""

    def __init__(self):
        super().__init__()
        self.problems: list[str] = []
        self.in_script = False
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        names = dict(attrs)
        if tag == "script":
            self.scripts += 1
            self.in_script = True
            if not names.get("src"):
                self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("<style> block")
        for name, _value in attrs:
            if name == "style":
                self.problems.append(f"style attribute on <{tag}>")
            if name.startswith("on"):
                self.problems.append(f"{name} handler on <{tag}>")
            if name in ("href", "src", "action") and (_value or "").strip().lower().startswith("javascript:"):
                self.problems.append(f"javascript: URL on <{tag}>")

    def handle_endtag(self, tag):
        if tag == "script":
            self.in_script = False

    def handle_data(self, data):
        if self.in_script and data.strip():
            self.problems.append("script body")


def csp_problems(html: str) -> list[str]:
    checker = PageChecker()
    checker.feed(html)
    return checker.problems
