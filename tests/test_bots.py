"""Bot engines: echo, and the OpenAI engine against a real streaming server on loopback."""

import pytest

from chatapp.chat.bots import BotError, EchoBot, OpenAIBot, bot_from_config
from tests.fake_openai import FakeOpenAIServer

HISTORY = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "first"},
           {"role": "user", "content": "say  this\nback"}]


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
    return OpenAIBot(base_url=server.base_url, model="test-model", api_key="sk-test", **kwargs)


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


def test_openai_stream_cut_mid_way_is_an_error_after_the_first_chunks():
    received = []
    with FakeOpenAIServer("die") as server:
        with pytest.raises(BotError, match="closed the stream|lost the connection"):
            for chunk in make_bot(server).stream(HISTORY):
                received.append(chunk)
    assert received == ["Hello", " from"]


def test_openai_hang_times_out():
    with FakeOpenAIServer("hang") as server:
        with pytest.raises(BotError, match="sent nothing for 0.5 s"):
            list(make_bot(server, read_timeout=0.5).stream(HISTORY))


def test_openai_http_error_is_readable():
    with FakeOpenAIServer("http500") as server:
        with pytest.raises(BotError, match="HTTP 500: model is overloaded"):
            list(make_bot(server).stream(HISTORY))


def test_openai_malformed_chunk():
    with FakeOpenAIServer("garbage") as server:
        with pytest.raises(BotError, match="malformed chunk"):
            list(make_bot(server).stream(HISTORY))


def test_openai_unreachable_server():
    from tests.servers import free_port

    bot = OpenAIBot(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", connect_timeout=1)
    with pytest.raises(BotError, match="model server"):
        list(bot.stream(HISTORY))
