"""Posting messages, the reply they start, regenerating, paging and streaming."""

import json

import pytest
import sqlalchemy as sa

from chatapp.chat.models import Message, Status
from chatapp.db import unit_of_work
from tests.api.test_accounts import assert_error
from tests.helpers import wait_for_background_work
from tests.support.sse import parse_events


@pytest.fixture
def conversation_url(client, alice):
    conversation = client.post("/api/v1/conversations", headers=alice, json={"title": "t"}).get_json()
    return f"/api/v1/conversations/{conversation['id']}"


def post(client, headers, url, content):
    response = client.post(url + "/messages", headers=headers, json={"content": content})
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def message_count(app) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Message))


def test_post_answers_202_with_the_message_and_a_pending_reply(client, app, alice, conversation_url):
    body = post(client, alice, conversation_url, "hello bot")
    assert body["message"]["role"] == "user" and body["message"]["content"] == "hello bot"
    assert body["message"]["status"] == "complete"
    assert body["reply"]["role"] == "assistant" and body["reply"]["status"] == "pending"
    assert body["reply"]["content"] == ""
    wait_for_background_work(app)
    items = client.get(conversation_url + "/messages", headers=alice).get_json()["items"]
    assert [(m["role"], m["content"], m["status"]) for m in items] == [
        ("user", "hello bot", "complete"),
        ("assistant", "hello bot", "complete"),
    ]


@pytest.mark.parametrize("content", ["", "   ", "x" * 32_001, 42, None, {"text": "hi"}])
def test_content_validation_writes_nothing(client, app, alice, conversation_url, content):
    error = assert_error(client.post(conversation_url + "/messages", headers=alice, json={"content": content}), 422)
    assert "content" in error["message"]
    assert message_count(app) == 0


def test_missing_content_names_the_field(client, app, alice, conversation_url):
    error = assert_error(client.post(conversation_url + "/messages", headers=alice, json={}), 422)
    assert "'content'" in error["message"]
    assert message_count(app) == 0


def test_longest_content_is_accepted(client, app, alice, conversation_url):
    post(client, alice, conversation_url, "y" * 32_000)
    wait_for_background_work(app)


def test_posting_bumps_the_conversation(client, app, alice, conversation_url):
    before = client.get(conversation_url, headers=alice).get_json()["updated_at"]
    post(client, alice, conversation_url, "hi")
    wait_for_background_work(app)
    assert client.get(conversation_url, headers=alice).get_json()["updated_at"] > before


@pytest.mark.parametrize("extra_config", [{"BOT_ECHO_DELAY": 1.0}], indirect=True)
def test_second_message_while_the_bot_answers_is_a_conflict(client, app, alice, conversation_url):
    post(client, alice, conversation_url, "one two three")
    assert_error(
        client.post(conversation_url + "/messages", headers=alice, json={"content": "again"}), 409, "reply_in_progress"
    )
    wait_for_background_work(app)
    assert message_count(app) == 2
    post(client, alice, conversation_url, "now it works")
    wait_for_background_work(app)


def test_message_paging_oldest_first(client, app, alice, conversation_url):
    for i in range(5):
        post(client, alice, conversation_url, f"m{i}")
        wait_for_background_work(app)
    seen, cursor = [], None
    while True:
        query = {"limit": 4} | ({"cursor": cursor} if cursor else {})
        page = client.get(conversation_url + "/messages", headers=alice, query_string=query).get_json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [m["id"] for m in seen] == sorted(m["id"] for m in seen)
    assert [m["content"] for m in seen] == [f"m{i // 2}" for i in range(10)]
    assert_error(client.get(conversation_url + "/messages", headers=alice, query_string={"cursor": "zz"}), 422)


def test_regenerate_adds_a_new_version_beside_a_complete_reply(client, app, alice, conversation_url):
    posted = post(client, alice, conversation_url, "again please")
    reply_id = posted["reply"]["id"]
    wait_for_background_work(app)
    response = client.post(f"{conversation_url}/messages/{reply_id}/regenerate", headers=alice)
    assert response.status_code == 202
    version = response.get_json()
    assert version["status"] == "pending" and version["content"] == ""
    assert version["id"] != reply_id and version["parent_id"] == posted["message"]["id"]
    assert version["siblings"] == {"index": 2, "count": 2, "previous_id": reply_id, "next_id": None}
    wait_for_background_work(app)
    with unit_of_work(app, write=False) as session:
        old, new = session.get(Message, reply_id), session.get(Message, version["id"])
        # The old version is kept as it was; the new one was generated from the same history.
        assert (old.status, old.content, old.attempt) == (Status.COMPLETE, "again please", 0)
        assert (new.status, new.content, new.parent_id) == (Status.COMPLETE, "again please", old.parent_id)
    listed = client.get(f"{conversation_url}/messages", headers=alice).get_json()["items"]
    assert [m["id"] for m in listed] == [posted["message"]["id"], version["id"]]


def test_regenerate_rules(client, app, alice, conversation_url):
    first = post(client, alice, conversation_url, "first")
    wait_for_background_work(app)
    post(client, alice, conversation_url, "second")
    wait_for_background_work(app)
    base = f"{conversation_url}/messages"
    assert_error(client.post(f"{base}/{first['reply']['id']}/regenerate", headers=alice), 409, "not_latest_reply")
    assert_error(client.post(f"{base}/{first['message']['id']}/regenerate", headers=alice), 404)
    assert_error(client.post(f"{base}/999999/regenerate", headers=alice), 404)


def test_stream_replays_a_finished_reply_then_done(client, app, alice, conversation_url):
    reply_id = post(client, alice, conversation_url, "line one\nline two")["reply"]["id"]
    wait_for_background_work(app)
    response = client.get(f"{conversation_url}/messages/{reply_id}/stream", headers=alice)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    events = parse_events(response.get_data(as_text=True))
    assert "".join(data for name, data in events if name == "message") == "line one\nline two"
    assert events[-1] == ("done", json.dumps({"status": "complete", "error": None}))


def test_stream_resumes_after_last_event_id(client, app, alice, conversation_url):
    reply_id = post(client, alice, conversation_url, "abcdef")["reply"]["id"]
    wait_for_background_work(app)
    response = client.get(f"{conversation_url}/messages/{reply_id}/stream", headers={**alice, "Last-Event-ID": "0:3"})
    events = parse_events(response.get_data(as_text=True))
    assert "".join(data for name, data in events if name == "message") == "def"


def test_stream_of_a_user_message_is_not_found(client, app, alice, conversation_url):
    message_id = post(client, alice, conversation_url, "hi")["message"]["id"]
    wait_for_background_work(app)
    assert_error(client.get(f"{conversation_url}/messages/{message_id}/stream", headers=alice), 404)


@pytest.mark.parametrize(
    "extra_config", [{"BOT_ECHO_DELAY": 1.5, "REPLY_FLUSH_INTERVAL": 0.05, "STREAM_POLL_INTERVAL": 0.05}], indirect=True
)
def test_stream_delivers_text_live_in_several_steps(client, app, alice, conversation_url):
    reply_id = post(client, alice, conversation_url, "one two three four five six")["reply"]["id"]
    response = client.get(f"{conversation_url}/messages/{reply_id}/stream", headers=alice, buffered=False)
    deltas = []
    for chunk in response.response:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        deltas += [data for name, data in parse_events(text) if name == "message"]
        if "event: done" in text:
            break
    response.close()
    assert "".join(deltas) == "one two three four five six"
    assert len(deltas) >= 3
    wait_for_background_work(app)


def test_unknown_reply_in_my_conversation_is_not_found(client, alice, conversation_url):
    assert_error(client.get(f"{conversation_url}/messages/424242/stream", headers=alice), 404, "message_not_found")
