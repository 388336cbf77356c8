"""The settings page: API tokens created (shown once), listed by prefix, revoked."""

import re

import pytest

from chatapp.auth.models import ApiToken
from tests.web.conftest import count


@pytest.fixture
def alice(web):
    web.register("alice")
    return web


def create_token(client, name="laptop") -> str:
    response = client.post("/settings/tokens", data={"name": name})
    assert response.status_code == 201
    assert response.headers["Cache-Control"] == "no-store"  # a secret: keep it out of caches
    return re.search(r'id="new-token" value="(chat_[^"]+)"', response.get_data(as_text=True)).group(1)


def test_no_tokens_yet(client, alice):
    html = client.get("/settings").get_data(as_text=True)
    assert "You have no active tokens." in html


def test_new_token_is_shown_once_and_works(client, app, alice):
    token = create_token(client)
    listing = client.get("/settings").get_data(as_text=True)
    assert token not in listing
    assert f"<code>{token[:12]}…</code>" in listing
    assert "<td>laptop</td>" in listing
    # The token acts for alice through the API.
    api = app.test_client()
    assert api.get("/api/v1/conversations", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_revoke_asks_first(client, app, alice):
    token = create_token(client)
    # The settings page links to a confirmation page; only its form revokes.
    confirm_url = re.search(r'href="(/settings/tokens/\d+/revoke)"', client.get("/settings").get_data(as_text=True))[1]
    confirm = client.get(confirm_url)
    assert confirm.status_code == 200
    page = confirm.get_data(as_text=True)
    assert "Revoke the token “laptop”?" in page and f'action="{confirm_url}"' in page
    assert count(app, ApiToken) == 1
    api = app.test_client()
    assert api.get("/api/v1/conversations", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    response = client.post(confirm_url)
    assert response.headers["Location"] == "/settings"
    html = client.get("/settings").get_data(as_text=True)
    assert "revoked." in html and "You have no active tokens." in html
    assert api.get("/api/v1/conversations", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_someone_elses_token_cannot_be_revoked(client, app, web):
    web.register("bob")
    bobs_token = create_token(client, "bob's")
    web.logout()
    web.register("alice")
    assert client.get("/settings/tokens/1/revoke").status_code == 404
    assert client.post("/settings/tokens/1/revoke").status_code == 404
    assert "bob&#39;s" not in client.get("/settings").get_data(as_text=True)
    api = app.test_client()
    assert api.get("/api/v1/conversations", headers={"Authorization": f"Bearer {bobs_token}"}).status_code == 200


def test_too_long_name_is_refused_and_writes_nothing(client, app, alice):
    response = client.post("/settings/tokens", data={"name": "x" * 101})
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "Name must be 0-100 characters." in html
    assert 'id="new-token"' not in html
    assert count(app, ApiToken) == 0
