"""Models, system prompts and generated titles, through the API, on both databases."""

import logging
import threading

import pytest
import sqlalchemy as sa

from chatapp.chat import titles
from chatapp.chat.bots import OpenAIBot, clear_model_cache
from chatapp.chat.models import Conversation, Message
from chatapp.db import unit_of_work
from tests.fake_openai import FakeOpenAIServer
from tests.helpers import checked_out, live_sessions, wait_for_background_work


@pytest.fixture(autouse=True)
def fresh_model_cache():
    clear_model_cache()
    yield
    clear_model_cache()


@pytest.fixture
def model_server(app):
    with FakeOpenAIServer("ok") as server:
        app.config.update(BOT_ENGINE="openai", OPENAI_BASE_URL=server.base_url, OPENAI_MODEL="test-model")
        yield server
        wait_for_background_work(app)


def create(client, headers, **body):
    return client.post("/api/v1/conversations", json=body, headers=headers)


def send(client, headers, conversation_id, content="hello there, model"):
    response = client.post(
        f"/api/v1/conversations/{conversation_id}/messages", json={"content": content}, headers=headers
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["reply"]["id"]


def stored_conversation(app, conversation_id):
    with unit_of_work(app, write=False) as session:
        c = session.get(Conversation, conversation_id)
        return {"title": c.title, "title_source": c.title_source, "model": c.model, "system_prompt": c.system_prompt}


def count_conversations(app):
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Conversation))


# --- GET /models -----------------------------------------------------------------------------


def test_the_echo_engine_lists_its_model(client, alice):
    response = client.get("/api/v1/models", headers=alice)
    assert response.status_code == 200
    assert response.get_json() == {"items": [{"id": "echo", "default": True}]}


def test_models_need_credentials(client):
    response = client.get("/api/v1/models")
    assert response.status_code == 401 and response.get_json()["error"]["code"]


def test_an_openai_server_lists_its_models_cached(client, alice, model_server):
    for _ in range(3):
        response = client.get("/api/v1/models", headers=alice)
        assert response.status_code == 200
        assert response.get_json()["items"] == [
            {"id": "test-model", "default": True},
            {"id": "other-model", "default": False},
        ]
    assert model_server.model_requests == 1  # cached for MODELS_CACHE_SECONDS


def test_the_default_model_is_listed_even_when_the_server_does_not_name_it(app, client, alice, model_server):
    app.config["OPENAI_MODEL"] = "llama3.2"
    items = client.get("/api/v1/models", headers=alice).get_json()["items"]
    assert items[0] == {"id": "llama3.2", "default": True} and len(items) == 3


def test_a_server_that_cannot_list_is_a_503_and_the_default_still_works(app, client, alice, model_server, caplog):
    model_server.models_status = 500
    with caplog.at_level(logging.WARNING, logger="chatapp.chat.catalog"):
        response = client.get("/api/v1/models", headers=alice)
    assert response.status_code == 503 and response.headers["Retry-After"]
    error = response.get_json()["error"]
    assert error["code"] == "models_unavailable" and "test-model" in error["message"]
    for private in ("127.0.0.1", str(model_server.httpd.server_address[1]), "sleeping"):
        assert private not in error["message"]
    assert any("models are sleeping" in r.getMessage() for r in caplog.records)
    # Choosing the default (or nothing) needs no list; another model cannot be checked.
    assert create(client, alice, model="test-model").status_code == 201
    assert create(client, alice).status_code == 201
    before = count_conversations(app)
    assert create(client, alice, model="other-model").status_code == 503
    assert count_conversations(app) == before


def test_an_unreachable_server_cannot_list():
    from tests.support.servers import free_port

    bot = OpenAIBot(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", connect_timeout=1)
    with pytest.raises(Exception, match="could not reach the model server") as caught:
        bot.models()
    assert "127.0.0.1" not in str(caught.value) and "127.0.0.1" in caught.value.detail


# --- choosing a model and a system prompt -------------------------------------------------------


def test_a_conversation_starts_with_a_model_and_system_prompt(app, client, alice, model_server):
    response = create(client, alice, title="Plans", model="other-model", system_prompt="Answer in French.")
    assert response.status_code == 201
    body = response.get_json()
    assert (body["model"], body["system_prompt"]) == ("other-model", "Answer in French.")
    assert stored_conversation(app, body["id"])["title_source"] == "user"
    listed = client.get("/api/v1/conversations", headers=alice).get_json()["items"][0]
    assert (listed["model"], listed["system_prompt"]) == ("other-model", "Answer in French.")


def test_model_and_system_prompt_change_later(app, client, alice, model_server):
    conversation_id = create(client, alice).get_json()["id"]
    url = f"/api/v1/conversations/{conversation_id}"
    body = client.patch(url, json={"model": "other-model", "system_prompt": "Be brief."}, headers=alice).get_json()
    assert (body["title"], body["model"], body["system_prompt"]) == ("New chat", "other-model", "Be brief.")
    # Empty: back to the server's defaults; a title alone leaves them as they are.
    client.patch(url, json={"model": "", "system_prompt": "  "}, headers=alice)
    assert client.patch(url, json={"title": "Renamed"}, headers=alice).status_code == 200
    assert stored_conversation(app, conversation_id) == {
        "title": "Renamed",
        "title_source": "user",
        "model": None,
        "system_prompt": None,
    }


@pytest.mark.parametrize("method", ["post", "patch"])
def test_an_unknown_model_is_a_422_naming_the_known_ones_and_writes_nothing(app, client, alice, model_server, method):
    conversation_id = create(client, alice).get_json()["id"]
    before = (count_conversations(app), stored_conversation(app, conversation_id))
    if method == "post":
        response = create(client, alice, model="gpt-99")
    else:
        response = client.patch(f"/api/v1/conversations/{conversation_id}", json={"model": "gpt-99"}, headers=alice)
    assert response.status_code == 422
    message = response.get_json()["error"]["message"]
    assert "gpt-99" in message and "test-model" in message and "other-model" in message
    assert (count_conversations(app), stored_conversation(app, conversation_id)) == before


def test_echo_refuses_a_model_it_does_not_have(client, alice):
    response = create(client, alice, model="llama3.2")
    assert response.status_code == 422 and "echo" in response.get_json()["error"]["message"]
    assert create(client, alice, model="echo").get_json()["model"] == "echo"


def test_an_oversize_system_prompt_is_a_422_and_writes_nothing(app, client, alice):
    app.config["SYSTEM_PROMPT_MAX_LENGTH"] = 50
    before = count_conversations(app)
    response = create(client, alice, system_prompt="x" * 51)
    assert response.status_code == 422
    assert "'system_prompt': must be 0-50 characters" in response.get_json()["error"]["message"]
    assert count_conversations(app) == before
    conversation_id = create(client, alice, system_prompt="x" * 50).get_json()["id"]
    response = client.patch(f"/api/v1/conversations/{conversation_id}", json={"system_prompt": "y" * 51}, headers=alice)
    assert response.status_code == 422
    assert stored_conversation(app, conversation_id)["system_prompt"] == "x" * 50


# --- what the reply uses -------------------------------------------------------------------------


def test_the_reply_uses_the_conversations_model_and_system_prompt(app, client, alice, model_server):
    conversation_id = create(client, alice, model="other-model", system_prompt="Answer in French.").get_json()["id"]
    reply_id = send(client, alice, conversation_id)
    wait_for_background_work(app)
    sent = model_server.requests[0]["body"]
    assert sent["model"] == "other-model"
    assert sent["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "hello there, model"},
    ]
    items = client.get(f"/api/v1/conversations/{conversation_id}/messages", headers=alice).get_json()["items"]
    assert [(m["id"], m["model"]) for m in items] == [(reply_id - 1, None), (reply_id, "other-model")]
    assert items[-1]["content"] == "Hello from the model."


def test_a_reply_records_the_default_model_and_a_changed_one_after_regenerating(app, client, alice, model_server):
    conversation_id = create(client, alice).get_json()["id"]
    reply_id = send(client, alice, conversation_id)
    wait_for_background_work(app)
    assert model_server.requests[0]["body"]["model"] == "test-model"
    client.patch(f"/api/v1/conversations/{conversation_id}", json={"model": "other-model"}, headers=alice)
    url = f"/api/v1/conversations/{conversation_id}/messages/{reply_id}/regenerate"
    regenerated = client.post(url, headers=alice)
    assert regenerated.status_code == 202
    wait_for_background_work(app)
    assert model_server.requests[1]["body"]["model"] == "other-model"
    with unit_of_work(app, write=False) as session:
        # Each version keeps the model that wrote it.
        assert session.get(Message, reply_id).model == "test-model"
        assert session.get(Message, regenerated.get_json()["id"]).model == "other-model"


def test_the_system_prompt_takes_its_share_of_the_history_budget(app, client, alice, model_server):
    app.config.update(BOT_HISTORY_MAX_CHARS=100, MESSAGE_MAX_LENGTH=100)
    conversation_id = create(client, alice, system_prompt="p" * 60).get_json()["id"]
    send(client, alice, conversation_id, "a" * 30)
    wait_for_background_work(app)
    send(client, alice, conversation_id, "b" * 30)
    wait_for_background_work(app)
    messages = model_server.requests[1]["body"]["messages"]
    # 60 of the prompt + 30 of the question leave no room for the earlier exchange.
    assert messages == [{"role": "system", "content": "p" * 60}, {"role": "user", "content": "b" * 30}]


def test_the_echo_reply_records_its_model(app, client, alice):
    conversation_id = create(client, alice).get_json()["id"]
    send(client, alice, conversation_id)
    wait_for_background_work(app)
    items = client.get(f"/api/v1/conversations/{conversation_id}/messages", headers=alice).get_json()["items"]
    assert [m["model"] for m in items] == [None, "echo"]


# --- titles -----------------------------------------------------------------------------------


def test_echo_titles_a_conversation_with_the_first_words_of_its_first_message(app, client, alice):
    conversation_id = create(client, alice).get_json()["id"]
    send(client, alice, conversation_id, "  Plan a\ntrip to   Lisbon in May with the kids please ")
    wait_for_background_work(app)
    assert stored_conversation(app, conversation_id)["title"] == "Plan a trip to Lisbon in"
    assert stored_conversation(app, conversation_id)["title_source"] == "auto"
    # The second reply keeps it.
    send(client, alice, conversation_id, "Something else entirely")
    wait_for_background_work(app)
    assert stored_conversation(app, conversation_id)["title"] == "Plan a trip to Lisbon in"


def test_a_title_given_at_creation_is_kept(app, client, alice):
    conversation_id = create(client, alice, title="Mine").get_json()["id"]
    send(client, alice, conversation_id)
    wait_for_background_work(app)
    assert stored_conversation(app, conversation_id)["title"] == "Mine"


def test_an_openai_server_titles_the_conversation_in_a_separate_request(app, client, alice, model_server):
    model_server.title_text = '"Title: A Greeting Exchange."\nmore text'
    conversation_id = create(client, alice, model="other-model").get_json()["id"]
    send(client, alice, conversation_id)
    wait_for_background_work(app)
    assert stored_conversation(app, conversation_id)["title"] == "A Greeting Exchange"
    (request,) = model_server.title_requests
    assert request["stream"] is False and request["model"] == "other-model"
    assert request["messages"][0] == {"role": "user", "content": "hello there, model"}
    assert request["messages"][1] == {"role": "assistant", "content": "Hello from the model."}
    body = client.get(f"/api/v1/conversations/{conversation_id}", headers=alice).get_json()
    assert body["title"] == "A Greeting Exchange"


def test_a_failed_title_keeps_the_default_and_only_logs(app, client, alice, model_server, caplog):
    model_server.title_text = ""
    conversation_id = create(client, alice).get_json()["id"]
    with caplog.at_level(logging.WARNING, logger="chatapp.chat.titles"):
        reply_id = send(client, alice, conversation_id)
        wait_for_background_work(app)
    assert stored_conversation(app, conversation_id)["title"] == "New chat"
    assert any("no title generated" in r.getMessage() for r in caplog.records)
    with unit_of_work(app, write=False) as session:
        reply = session.get(Message, reply_id)
        assert (reply.status.value, reply.error) == ("complete", None)


def test_a_rename_while_the_title_is_generated_wins(app, client, alice, model_server):
    model_server.title_gate = threading.Event()
    conversation_id = create(client, alice).get_json()["id"]
    send(client, alice, conversation_id)
    assert model_server.title_waiting.wait(10)
    # The job has read the default title and waits on the model: the user renames now.
    response = client.patch(f"/api/v1/conversations/{conversation_id}", json={"title": "My name"}, headers=alice)
    assert response.status_code == 200
    model_server.title_gate.set()
    wait_for_background_work(app)
    assert stored_conversation(app, conversation_id)["title"] == "My name"


def test_the_title_job_holds_no_connection_while_the_model_thinks(app, client, alice, model_server, request):
    model_server.title_gate = threading.Event()
    conversation_id = create(client, alice).get_json()["id"]
    send(client, alice, conversation_id)
    assert model_server.title_waiting.wait(10)
    assert checked_out(app) == 0
    assert live_sessions() == 0
    if not app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        database = request.getfixturevalue("postgres_database")
        assert database.backends_in_state("idle in transaction") == []
    model_server.title_gate.set()
    wait_for_background_work(app)
    assert stored_conversation(app, conversation_id)["title_source"] == "auto"


def test_title_cleaning():
    assert titles.clean_title('  "Title: Rust vs. Go."  ', 200) == "Rust vs. Go"
    assert titles.clean_title("\n\n**Weekend plans**\nignored", 200) == "Weekend plans"
    assert titles.clean_title("word " * 100, 20) == "word word word word…"
