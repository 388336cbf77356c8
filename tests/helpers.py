"""Assertions and actions shared by the tests."""

from __future__ import annotations

from flask import Flask

from chatapp.db import db


def checked_out(app: Flask) -> int:
    with app.app_context():
        total = sum(engine.pool.checkedout() for engine in db.engines.values())
    return total


def live_sessions() -> int:
    """Sessions currently held by the registry, across every scope (thread, app context)."""
    return len(db.session.registry.registry)


def wait_for_background_work(app: Flask, timeout: float = 30.0) -> None:
    runner = app.extensions.get("chatapp.reply_runner")
    if runner is not None:
        assert runner.wait_idle(timeout), "reply runner still busy after the test"


def assert_no_leaks(app: Flask) -> None:
    assert live_sessions() == 0, f"session registry still holds {live_sessions()} session(s)"
    assert checked_out(app) == 0, f"{checked_out(app)} connection(s) still checked out"


class AuthActions:
    """Registers users and gets API tokens through the public API."""

    def __init__(self, client):
        self._client = client

    def register(self, username: str = "alice", password: str = "correct horse") -> dict:
        response = self._client.post(
            "/api/v1/users", json={"username": username, "password": password}
        )
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    def token(self, username: str = "alice", password: str = "correct horse") -> str:
        response = self._client.post(
            "/api/v1/tokens", json={"username": username, "password": password}
        )
        assert response.status_code == 201, response.get_json()
        return response.get_json()["token"]

    def headers(self, username: str = "alice", password: str = "correct horse") -> dict:
        self.register(username, password)
        return {"Authorization": f"Bearer {self.token(username, password)}"}
