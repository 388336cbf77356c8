"""Conversations: create, list with cursors, read, rename, delete; never someone else's."""

import pytest
import sqlalchemy as sa

from chatapp.chat.models import Conversation
from chatapp.db import unit_of_work
from tests.api.test_accounts import assert_error


@pytest.fixture
def bob(auth):
    return auth.headers("bob")


def create(client, headers, **body):
    response = client.post("/api/v1/conversations", headers=headers, json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_create_with_default_and_given_title(client, alice):
    assert create(client, alice)["title"] == "New chat"
    body = create(client, alice, title="  Trip planning ")
    assert body["title"] == "Trip planning"
    assert set(body) >= {"id", "title", "created_at", "updated_at"}


def test_create_without_a_body(client, alice):
    response = client.post("/api/v1/conversations", headers=alice)
    assert response.status_code == 201


@pytest.mark.parametrize("title", ["", "x" * 201, 5, None, ["a"]])
def test_title_validation(client, app, alice, title):
    assert_error(client.post("/api/v1/conversations", headers=alice, json={"title": title}), 422, "invalid")
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Conversation)) == 0


def test_whitespace_title_is_rejected(client, alice):
    error = assert_error(client.post("/api/v1/conversations", headers=alice, json={"title": "   "}), 422)
    assert "title" in error["message"]


def test_get_patch_delete(client, alice):
    conversation = create(client, alice, title="One")
    url = f"/api/v1/conversations/{conversation['id']}"
    assert client.get(url, headers=alice).get_json()["title"] == "One"
    renamed = client.patch(url, headers=alice, json={"title": "Two"})
    assert renamed.status_code == 200 and renamed.get_json()["title"] == "Two"
    assert renamed.get_json()["updated_at"] > conversation["updated_at"]
    assert_error(client.patch(url, headers=alice, json={}), 422)
    assert_error(client.patch(url, headers=alice, json={"title": ""}), 422)
    assert client.delete(url, headers=alice).status_code == 204
    assert_error(client.get(url, headers=alice), 404, "conversation_not_found")
    assert_error(client.delete(url, headers=alice), 404)


def test_someone_elses_conversation_is_not_found(client, app, alice, bob):
    conversation = create(client, alice, title="Private")
    url = f"/api/v1/conversations/{conversation['id']}"
    missing = assert_error(client.get("/api/v1/conversations/999999", headers=bob), 404)
    for method, kwargs in [("get", {}), ("patch", {"json": {"title": "pwned"}}), ("delete", {})]:
        error = assert_error(getattr(client, method)(url, headers=bob, **kwargs), 404)
        assert error == missing  # indistinguishable from a missing one
    for suffix, method, kwargs in [
        ("/messages", "get", {}),
        ("/messages", "post", {"json": {"content": "hi"}}),
        ("/messages/1/regenerate", "post", {}),
        ("/messages/1/stream", "get", {}),
    ]:
        assert_error(getattr(client, method)(url + suffix, headers=bob, **kwargs), 404)
    assert client.get(url, headers=alice).get_json()["title"] == "Private"
    assert client.get("/api/v1/conversations", headers=bob).get_json()["items"] == []


def test_list_newest_first_with_cursor_paging(client, alice, bob):
    ids = [create(client, alice, title=f"c{i}")["id"] for i in range(7)]
    create(client, bob, title="bob's")
    # Renaming bumps updated_at: c2 moves to the top.
    client.patch(f"/api/v1/conversations/{ids[2]}", headers=alice, json={"title": "c2 renamed"})
    expected = [ids[2]] + [i for i in reversed(ids) if i != ids[2]]
    seen, cursor = [], None
    while True:
        query = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get("/api/v1/conversations", headers=alice, query_string=query).get_json()
        assert len(page["items"]) <= 3
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected


def test_list_default_limit_is_20(client, alice):
    for i in range(21):
        create(client, alice, title=f"c{i}")
    page = client.get("/api/v1/conversations", headers=alice).get_json()
    assert len(page["items"]) == 20 and page["next_cursor"]


@pytest.mark.parametrize(
    "query",
    [{"limit": 0}, {"limit": 101}, {"limit": "ten"}, {"cursor": "%%%"}, {"cursor": "bm9wZQ"}, {"cursor": "eHx5"}],
)
def test_list_rejects_bad_paging(client, alice, query):
    error = assert_error(client.get("/api/v1/conversations", headers=alice, query_string=query), 422)
    assert next(iter(query)) in error["message"]
