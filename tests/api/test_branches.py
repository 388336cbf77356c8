"""Messages form a tree: an edit starts a branch, a regenerated reply is a new version beside
the old one, any branch can be made current again, and the bot sees only the reply's branch."""

import pytest
import sqlalchemy as sa

from chatapp.chat import services
from chatapp.chat.models import Conversation, Message
from chatapp.db import unit_of_work
from tests.api.test_accounts import assert_error
from tests.helpers import wait_for_background_work


class RecordingBot:
    """Answers "answer N" and keeps the history each reply was generated from."""

    def __init__(self):
        self.histories: list[list[dict]] = []

    def stream(self, history, cancel=None, **options):
        self.histories.append(history)
        yield f"answer {len(self.histories)}"


@pytest.fixture
def bot(monkeypatch):
    recording = RecordingBot()
    monkeypatch.setattr("chatapp.chat.pipeline.bot_from_config", lambda config: recording)
    return recording


def send(client, app, headers, url, content):
    response = client.post(f"{url}/messages", headers=headers, json={"content": content})
    assert response.status_code == 202, response.get_json()
    wait_for_background_work(app)
    return response.get_json()


def edit(client, app, headers, url, message_id, content):
    response = client.post(f"{url}/messages/{message_id}/edit", headers=headers, json={"content": content})
    assert response.status_code == 202, response.get_json()
    wait_for_background_work(app)
    return response.get_json()


def shown(client, headers, url, **query) -> list[str]:
    response = client.get(f"{url}/messages", headers=headers, query_string=query)
    assert response.status_code == 200, response.get_json()
    return [m["content"] for m in response.get_json()["items"]]


def texts(history: list[dict]) -> list[str]:
    return [m["content"] for m in history]


def leaf_of(app, url) -> int | None:
    with unit_of_work(app, write=False) as session:
        return session.get(Conversation, int(url.rsplit("/", 1)[1])).current_leaf_id


def test_posting_appends_to_the_current_branch(client, app, alice, conversation_url, bot):
    first = send(client, app, alice, conversation_url, "one")
    second = send(client, app, alice, conversation_url, "two")
    assert first["message"]["parent_id"] is None
    assert first["reply"]["parent_id"] == first["message"]["id"]
    assert second["message"]["parent_id"] == first["reply"]["id"]
    assert second["reply"]["parent_id"] == second["message"]["id"]
    assert leaf_of(app, conversation_url) == second["reply"]["id"]
    assert shown(client, alice, conversation_url) == ["one", "answer 1", "two", "answer 2"]
    assert texts(bot.histories[1]) == ["one", "answer 1", "two"]


def test_an_edit_branches_and_the_old_branch_stays(client, app, alice, conversation_url, bot):
    first = send(client, app, alice, conversation_url, "one")
    second = send(client, app, alice, conversation_url, "two")
    send(client, app, alice, conversation_url, "three")
    edited = edit(client, app, alice, conversation_url, second["message"]["id"], "two, edited")
    message, reply = edited["message"], edited["reply"]
    assert message["parent_id"] == first["reply"]["id"] and message["content"] == "two, edited"
    assert reply["parent_id"] == message["id"] and reply["status"] == "pending"
    assert message["siblings"] == {
        "index": 2,
        "count": 2,
        "previous_id": second["message"]["id"],
        "next_id": None,
    }
    # The bot saw the new branch only: nothing of "two" or "three".
    assert texts(bot.histories[-1]) == ["one", "answer 1", "two, edited"]
    assert shown(client, alice, conversation_url) == ["one", "answer 1", "two, edited", "answer 4"]
    items = client.get(f"{conversation_url}/messages", headers=alice).get_json()["items"]
    assert items[2]["siblings"]["previous_id"] == second["message"]["id"]
    assert items[0]["siblings"] == {"index": 1, "count": 1, "previous_id": None, "next_id": None}

    # Back to the old branch: from the old message down to its newest leaf, as it was.
    switched = client.put(f"{conversation_url}/branch", headers=alice, json={"message_id": second["message"]["id"]})
    assert switched.status_code == 200, switched.get_json()
    body = switched.get_json()
    assert [m["content"] for m in body["items"]] == ["one", "answer 1", "two", "answer 2", "three", "answer 3"]
    assert body["current_leaf_id"] == body["items"][-1]["id"] == leaf_of(app, conversation_url)
    assert body["items"][2]["siblings"] == {"index": 1, "count": 2, "previous_id": None, "next_id": message["id"]}
    # Posting now continues the old branch, and the bot sees that branch.
    send(client, app, alice, conversation_url, "four")
    assert texts(bot.histories[-1]) == ["one", "answer 1", "two", "answer 2", "three", "answer 3", "four"]


def test_editing_the_first_message_makes_a_second_root(client, app, alice, conversation_url, bot):
    first = send(client, app, alice, conversation_url, "one")
    send(client, app, alice, conversation_url, "two")
    edited = edit(client, app, alice, conversation_url, first["message"]["id"], "uno")
    assert edited["message"]["parent_id"] is None
    assert edited["message"]["siblings"]["index"] == 2 and edited["message"]["siblings"]["count"] == 2
    assert texts(bot.histories[-1]) == ["uno"]
    assert shown(client, alice, conversation_url) == ["uno", "answer 3"]
    versions = client.get(f"{conversation_url}/messages/{first['message']['id']}/siblings", headers=alice)
    assert versions.status_code == 200
    assert [m["content"] for m in versions.get_json()["items"]] == ["one", "uno"]


def test_regenerate_keeps_versions_and_the_switcher_moves_between_them(client, app, alice, conversation_url, bot):
    posted = send(client, app, alice, conversation_url, "hello")
    url = f"{conversation_url}/messages"
    ids = [posted["reply"]["id"]]
    for _ in range(2):
        response = client.post(f"{url}/{ids[-1]}/regenerate", headers=alice)
        assert response.status_code == 202, response.get_json()
        ids.append(response.get_json()["id"])
        wait_for_background_work(app)
    # Each version was generated from the same history: the user's message alone.
    assert [texts(h) for h in bot.histories] == [["hello"]] * 3
    versions = client.get(f"{url}/{ids[0]}/siblings", headers=alice).get_json()["items"]
    assert [v["content"] for v in versions] == ["answer 1", "answer 2", "answer 3"]
    assert [v["siblings"]["index"] for v in versions] == [1, 2, 3]
    assert shown(client, alice, conversation_url) == ["hello", "answer 3"]
    assert client.put(f"{conversation_url}/branch", headers=alice, json={"message_id": ids[1]}).status_code == 200
    assert shown(client, alice, conversation_url) == ["hello", "answer 2"]
    # An older version is not the latest reply of the branch: only the current one regenerates.
    assert_error(client.post(f"{url}/{ids[0]}/regenerate", headers=alice), 409, "not_latest_reply")
    # Selecting the user's message follows its newest reply.
    assert client.put(f"{conversation_url}/branch", headers=alice, json={"message_id": posted["message"]["id"]})
    assert shown(client, alice, conversation_url) == ["hello", "answer 3"]


def test_paging_walks_the_current_branch_only(client, app, alice, conversation_url, bot):
    sent = [send(client, app, alice, conversation_url, f"m{n}") for n in range(6)]
    edit(client, app, alice, conversation_url, sent[3]["message"]["id"], "m3 again")
    for n in range(6, 8):
        send(client, app, alice, conversation_url, f"m{n}")
    expected = []
    for n, content in enumerate(["m0", "m1", "m2", "m3 again", "m6", "m7"]):
        expected += [content, f"answer {n + 1 if n < 3 else n + 4}"]
    seen, cursor = [], None
    while True:
        query = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"{conversation_url}/messages", headers=alice, query_string=query).get_json()
        seen += [m["content"] for m in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected


def test_the_history_sent_is_the_replys_branch_in_one_query(app, client, alice, conversation_url, bot):
    first = send(client, app, alice, conversation_url, "one")
    send(client, app, alice, conversation_url, "two")
    edited = edit(client, app, alice, conversation_url, first["message"]["id"], "uno")
    statements = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    with app.app_context():
        engine = services.db.engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        with app.test_request_context():
            # Read as a reply would be; the reply is finished, so read its ancestors directly.
            history = list(services._history_newest_first(edited["reply"]["id"], 100_000))
            services.db.session.rollback()
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert texts(history) == ["uno"]
    assert len(statements) == 1 and "RECURSIVE" in statements[0].upper()


def test_bad_edits_and_switches_change_nothing(client, app, auth, alice, conversation_url, bot):
    posted = send(client, app, alice, conversation_url, "mine")
    url = f"{conversation_url}/messages"
    message_id, reply_id = posted["message"]["id"], posted["reply"]["id"]
    other = client.post("/api/v1/conversations", headers=alice, json={}).get_json()["id"]
    mallory = auth.headers("mallory")
    with unit_of_work(app, write=False) as session:
        before = session.scalar(sa.select(sa.func.count()).select_from(Message))
    leaf = leaf_of(app, conversation_url)

    assert_error(client.post(f"{url}/{message_id}/edit", headers=mallory, json={"content": "x"}), 404)
    assert_error(client.post(f"{url}/{reply_id}/edit", headers=alice, json={"content": "x"}), 422)
    assert_error(client.post(f"{url}/999999/edit", headers=alice, json={"content": "x"}), 404, "message_not_found")
    other_url = f"/api/v1/conversations/{other}/messages/{message_id}/edit"
    assert_error(client.post(other_url, headers=alice, json={"content": "x"}), 404, "message_not_found")
    for content in ("", "   ", "x" * 32_001, None, 5):
        assert_error(client.post(f"{url}/{message_id}/edit", headers=alice, json={"content": content}), 422)
    assert_error(client.post(f"{url}/{message_id}/edit", headers=alice, json={}), 422)

    branch = f"{conversation_url}/branch"
    assert_error(client.put(branch, headers=mallory, json={"message_id": message_id}), 404)
    assert_error(
        client.put(f"/api/v1/conversations/{other}/branch", headers=alice, json={"message_id": message_id}), 404
    )
    assert_error(client.put(branch, headers=alice, json={"message_id": 999999}), 404, "message_not_found")
    for value in ("1", None, 0, -1, 1.5, 2**40):
        assert_error(client.put(branch, headers=alice, json={"message_id": value}), 422)
    assert_error(client.get(f"{url}/{message_id}/siblings", headers=mallory), 404)
    assert_error(client.get(f"{url}/999999/siblings", headers=alice), 404, "message_not_found")

    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == before
    assert leaf_of(app, conversation_url) == leaf


def test_no_edit_while_a_reply_is_being_generated(client, app, alice, conversation_url, gated_bot):
    posted = client.post(f"{conversation_url}/messages", headers=alice, json={"content": "wait"}).get_json()
    assert gated_bot.thinking.wait(10)
    try:
        response = client.post(
            f"{conversation_url}/messages/{posted['message']['id']}/edit", headers=alice, json={"content": "now"}
        )
        assert_error(response, 409, "reply_in_progress")
        assert leaf_of(app, conversation_url) == posted["reply"]["id"]
    finally:
        gated_bot.go_on.set()
    wait_for_background_work(app)
    assert shown(client, alice, conversation_url) == ["wait", "partial answer"]
