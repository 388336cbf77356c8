"""Bot engines: echo, and the OpenAI engine against a real streaming server on loopback."""

import logging

import pytest

from chatapp.chat.bots import BotError, EchoBot, OpenAIBot, bot_from_config, masked_url
from tests.fake_openai import FakeOpenAIServer

HISTORY = [
    {"role": "user", "content": "first"},
    {"role": "assistant", "content": "first"},
    {"role": "user", "content": "say  this\nback"},
]


def test_echo_answers_the_last_user_message_word_by_word():
    chunks = list(EchoBot().stream(HISTORY))
    assert "".join(chunks) == "say  this\nback"
    assert len(chunks) == 3


def test_echo_spreads_words_over_the_delay(monkeypatch):
    sleeps = []
    monkeypatch.setattr("chatapp.chat.bots.time.sleep", sleeps.append)
    list(EchoBot(delay=3).stream([{"role": "user", "content": "a b c d"}]))
    assert sleeps == [0.75] * 4


def test_unknown_engine_is_a_bot_error():
    with pytest.raises(BotError, match="unknown BOT_ENGINE"):
        bot_from_config({"BOT_ENGINE": "nope"})


def make_bot(server, **kwargs):
    kwargs.setdefault("base_url", server.base_url)
    return OpenAIBot(model="test-model", api_key="sk-test", **kwargs)


def test_openai_streams_chunks_and_sends_the_history():
    with FakeOpenAIServer("ok") as server:
        chunks = list(make_bot(server, system_prompt="be brief").stream(HISTORY))
    assert chunks == ["Hello", " from", " the", " model."]
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["body"]["stream"] is True and request["body"]["model"] == "test-model"
    assert request["body"]["messages"][0] == {"role": "system", "content": "be brief"}
    assert request["body"]["messages"][1:] == HISTORY


# Users see a reply's error; the model server's address and credentials, and whatever it
# answered, are for the operator's log only.
PASSWORD = "hunter2-model-secret"


def credentialed(base_url: str) -> str:
    """The server's base URL with a user and password in it, as an operator might write it."""
    return base_url.replace("http://", f"http://operator:{PASSWORD}@")


def failure(bot, history=HISTORY, received=None) -> BotError:
    with pytest.raises(BotError) as caught:
        for chunk in bot.stream(history):
            if received is not None:
                received.append(chunk)
    return caught.value


def assert_private(error: BotError, port: int, *logged: str) -> None:
    """The message names no host, port or credential; the detail has them masked, and ``logged``."""
    message = str(error)
    for private in ("127.0.0.1", str(port), PASSWORD, "operator", "http://"):
        assert private not in message, (private, message)
    assert f"http://***@127.0.0.1:{port}/v1/chat/completions" in error.detail, error.detail
    assert PASSWORD not in error.detail and "operator" not in error.detail
    for text in logged:
        assert text in error.detail, (text, error.detail)


def server_port(server) -> int:
    return server.httpd.server_address[1]


def test_openai_sends_the_url_credentials_as_basic_auth():
    with FakeOpenAIServer("ok") as server:
        bot = OpenAIBot(base_url=credentialed(server.base_url), model="m")
        assert "".join(bot.stream(HISTORY)) == "Hello from the model."
    assert server.requests[0]["headers"]["Authorization"].startswith("Basic ")


def test_openai_stream_cut_mid_way_is_an_error_after_the_first_chunks():
    received = []
    with FakeOpenAIServer("die") as server:
        error = failure(make_bot(server, base_url=credentialed(server.base_url)), received=received)
    assert received == ["Hello", " from"]
    assert "closed the stream" in str(error) or "lost the connection" in str(error)
    assert_private(error, server_port(server))


def test_openai_hang_times_out():
    with FakeOpenAIServer("hang") as server:
        error = failure(make_bot(server, base_url=credentialed(server.base_url), read_timeout=0.5))
    assert "sent nothing for 0.5 s" in str(error)
    assert_private(error, server_port(server), "timed out")


def test_openai_http_error_says_the_status_and_logs_the_body():
    with FakeOpenAIServer("http500") as server:
        error = failure(make_bot(server, base_url=credentialed(server.base_url)))
    assert str(error) == "the model server answered with an error (HTTP 500); try again later"
    assert_private(error, server_port(server), "HTTP 500: model is overloaded")
    assert "overloaded" not in str(error)


def test_openai_malformed_chunk():
    with FakeOpenAIServer("garbage") as server:
        error = failure(make_bot(server, base_url=credentialed(server.base_url)))
    assert str(error) == "the model server sent a malformed reply"
    assert_private(error, server_port(server), "malformed chunk", "{not json")


def test_openai_unreachable_server():
    from tests.support.servers import free_port

    port = free_port()
    bot = OpenAIBot(base_url=credentialed(f"http://127.0.0.1:{port}/v1"), model="m", connect_timeout=1)
    error = failure(bot)
    assert str(error) == "could not reach the model server; try again later"
    assert_private(error, port, "Connection refused")


def test_the_api_key_never_reaches_the_detail():
    """An exception's text can quote the request; the key and the URL's secrets are masked."""
    bot = OpenAIBot(base_url=f"http://operator:{PASSWORD}@127.0.0.1:1/v1", model="m", api_key="sk-live-key")
    detail = bot._detail(f"failed for http://operator:{PASSWORD}@127.0.0.1:1/v1 with Bearer sk-live-key")
    assert detail.startswith("http://***@127.0.0.1:1/v1/chat/completions: failed for http://***@127.0.0.1:1/v1")
    for secret in (PASSWORD, "sk-live-key", "operator"):
        assert secret not in detail, detail


def test_masked_url():
    assert masked_url("https://u:p@models.internal:8443/v1/chat/completions?api-key=k") == (
        "https://***@models.internal:8443/v1/chat/completions?***"
    )
    assert masked_url("http://127.0.0.1:11434/v1/chat/completions") == "http://127.0.0.1:11434/v1/chat/completions"


def test_a_failed_reply_shows_a_general_error_and_logs_the_details(app, client, auth, caplog):
    """Through the real pipeline: the reply's error (what the user sees) against the log."""
    headers = auth.headers("bot-user")
    conversation = client.post("/api/v1/conversations", json={}, headers=headers).get_json()
    url = f"/api/v1/conversations/{conversation['id']}/messages"
    with FakeOpenAIServer("http500") as server, caplog.at_level(logging.WARNING, logger="chatapp.chat.pipeline"):
        app.config.update(BOT_ENGINE="openai", OPENAI_BASE_URL=credentialed(server.base_url))
        reply_id = client.post(url, json={"content": "hi"}, headers=headers).get_json()["reply"]["id"]
        assert app.extensions["chatapp.reply_runner"].wait_idle(30)
    port = server_port(server)

    reply = client.get(url, headers=headers).get_json()["items"][-1]
    assert reply["id"] == reply_id and reply["status"] == "failed"
    assert reply["error"] == "the model server answered with an error (HTTP 500); try again later"
    page = client.get(f"/api/v1/conversations/{conversation['id']}/messages/{reply_id}/stream", headers=headers)
    for shown in (reply["error"], page.get_data(as_text=True)):
        for private in ("127.0.0.1", str(port), PASSWORD, "operator", "overloaded"):
            assert private not in shown, (private, shown)

    logged = [r.getMessage() for r in caplog.records if r.name == "chatapp.chat.pipeline"]
    assert len(logged) == 1, logged
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "chatapp.chat.pipeline")
    for text in (f"reply {reply_id} (attempt 0)", "HTTP 500: model is overloaded", f"***@127.0.0.1:{port}"):
        assert text in logged[0], (text, logged[0])
    assert PASSWORD not in logged[0] and "operator" not in logged[0]


def test_a_cancel_ends_a_blocked_read_at_once_and_the_server_sees_the_client_go():
    """A silent model keeps the read blocked for read_timeout; the cancel callback closes it."""
    import threading

    from chatapp.chat.runner import Cancellation

    cancel = Cancellation()
    received: list[str] = []
    outcome: list[object] = []
    with FakeOpenAIServer("silent") as server:
        bot = make_bot(server, read_timeout=60)

        def read():
            try:
                for chunk in bot.stream(HISTORY, cancel):
                    received.append(chunk)
                    got_first.set()
                outcome.append("ended")
            except BotError as error:
                outcome.append(error)

        got_first = threading.Event()
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert got_first.wait(10)
        cancel.cancel("stopped")
        reader.join(10)  # an upper bound for a loaded machine: without the cancel, 60 s
        assert not reader.is_alive()
        assert server.client_gone.wait(10)
    assert received == ["Hello"] and len(outcome) == 1


def test_openai_models_are_listed_and_cached_per_server():
    from chatapp.chat.bots import clear_model_cache

    clear_model_cache()
    with FakeOpenAIServer("ok") as server:
        bot = make_bot(server)
        assert bot.cached_models() is None
        assert bot.models() == ["test-model", "other-model"]
        server.models = ["changed"]
        assert make_bot(server).models() == ["test-model", "other-model"]  # cached
        assert server.model_requests == 1
        clear_model_cache()
        assert bot.models() == ["changed"]
    clear_model_cache()


def test_openai_models_error_is_private():
    from chatapp.chat.bots import clear_model_cache

    clear_model_cache()
    with FakeOpenAIServer("ok") as server:
        server.models_status = 503
        error = failure_of(make_bot(server, base_url=credentialed(server.base_url)).models)
    assert str(error) == "the model server answered with an error (HTTP 503); try again later"
    assert "/v1/models" in error.detail and "models are sleeping" in error.detail
    assert PASSWORD not in error.detail and "127.0.0.1" not in str(error)


def failure_of(call) -> BotError:
    with pytest.raises(BotError) as caught:
        call()
    return caught.value


def test_openai_title_is_a_separate_non_streamed_request():
    with FakeOpenAIServer("ok") as server:
        server.title_text = "Greeting"
        title = make_bot(server, title_prompt="Name it.").title("hi there", "hello", model="other-model")
    assert title == "Greeting"
    (body,) = server.title_requests
    assert body["stream"] is False and body["model"] == "other-model"
    assert body["messages"] == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Name it."},
    ]
    assert server.requests == []  # no streamed request


def test_openai_title_is_bounded_in_time():
    import threading

    with FakeOpenAIServer("ok") as server:
        server.title_gate = threading.Event()
        error = failure_of(lambda: make_bot(server, title_timeout=0.5).title("hi", "hello"))
    assert "sent nothing" in str(error) or "in time" in str(error)


def test_the_conversation_model_and_system_prompt_override_the_defaults():
    with FakeOpenAIServer("ok") as server:
        bot = make_bot(server, system_prompt="default prompt")
        list(bot.stream(HISTORY, model="other-model", system_prompt="Speak French."))
        list(bot.stream(HISTORY, system_prompt=""))  # an explicit empty prompt sends none
    first, second = (request["body"] for request in server.requests)
    assert first["model"] == "other-model"
    assert first["messages"][0] == {"role": "system", "content": "Speak French."}
    assert second["model"] == "test-model" and second["messages"] == HISTORY


def test_echo_offers_its_model_and_titles_with_the_first_words():
    from chatapp.chat.bots import first_words

    bot = EchoBot()
    assert bot.models() == ["echo"] and bot.default_model == "echo"
    assert bot.title("  one two\nthree four five six seven", "ignored") == "one two three four five six"
    assert first_words("abcdefghij klm", 5) == "abcd…"


def test_one_process_streams_more_replies_at_once_than_httpx_s_default_pool_holds():
    # A Celery worker with --concurrency 200 (or REPLY_WORKERS 200) runs that many replies in
    # one process, all through one client: none may wait for a pooled connection and fail.
    with FakeOpenAIServer("hang") as server:
        bot = make_bot(server, connect_timeout=1)
        streams = [bot.stream(HISTORY) for _ in range(110)]
        try:
            firsts = [next(stream) for stream in streams]
        finally:
            server.release.set()
            for stream in streams:
                stream.close()
    assert firsts == ["Hello"] * 110
