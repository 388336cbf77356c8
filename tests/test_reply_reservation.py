"""A reply's place is reserved before the view's transaction: no connection waits on Redis.

In queue mode ``reserve`` pings the queue's Redis, which takes up to REPLY_QUEUE_TIMEOUT
when Redis accepts connections and never answers (a host gone dark, a full network
buffer). Each of the seven views that start a reply must then answer 503
``replies_unavailable``, write nothing, and hold no database connection while it waits:
not the view's, and not the one its authentication read used.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from chatapp.auth import services as auth_services
from chatapp.chat import services as chat_services
from chatapp.chat.models import Conversation, Message
from chatapp.chat.runner import get_runner
from chatapp.db import unit_of_work
from tests.helpers import checked_out
from tests.tcp_proxy import TcpProxy

PASSWORD = "correct horse"


@pytest.fixture
def blackholed_redis():
    """A socket that accepts connections and never answers, where Redis should be."""
    proxy = TcpProxy("127.0.0.1", 9)  # nothing passes through: the upstream is never dialled
    proxy.set_mode("blackhole")
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def extra_config(request) -> dict:
    """Queue mode on the dark Redis, unless a test parametrizes its own config."""
    if hasattr(request, "param"):
        return request.param
    port = request.getfixturevalue("blackholed_redis").port
    return {
        "REPLY_QUEUE": f"redis://127.0.0.1:{port}/0",
        "REPLY_QUEUE_TIMEOUT": 0.3,
        # Notices and rate limits would use the same dark Redis: the reservation is under test.
        "REPLY_EVENTS": "off",
    }


@pytest.fixture
def pings(app, monkeypatch) -> list[int]:
    """The connections checked out at each of the queue's pings, as the ping starts."""
    runner = get_runner(app)
    seen: list[int] = []
    ping = runner.redis.ping

    def ping_counting_connections():
        seen.append(checked_out(app))
        return ping()

    monkeypatch.setattr(runner.redis, "ping", ping_counting_connections)
    return seen


def seed_exchange(app, username: str) -> tuple[int, int, int]:
    """A conversation with one finished exchange: (conversation, message, reply) ids."""
    with unit_of_work(app) as session:
        user = auth_services.find_user(username)
        conversation = chat_services.create_conversation(user.id)
        message, reply = chat_services.post_message(conversation, "question")
        chat_services.finish_reply(reply.id, reply.attempt, "answer", None)
        session.flush()
        return conversation.id, message.id, reply.id


def stored(app) -> tuple[int, int]:
    with unit_of_work(app, write=False) as session:
        return (
            session.scalar(sa.select(sa.func.count()).select_from(Conversation)),
            session.scalar(sa.select(sa.func.count()).select_from(Message)),
        )


API_ROUTES = {
    "post": ("/api/v1/conversations/{c}/messages", {"content": "hello"}),
    "edit": ("/api/v1/conversations/{c}/messages/{m}/edit", {"content": "edited"}),
    "regenerate": ("/api/v1/conversations/{c}/messages/{r}/regenerate", None),
}
WEB_ROUTES = {
    "send": ("/c/{c}/messages", {"content": "hello"}),
    "edit": ("/c/{c}/messages/{m}/edit", {"content": "edited"}),
    "regenerate": ("/c/{c}/messages/{r}/regenerate", {}),
    "new chat": ("/chat/new", {"content": "hello", "model": "", "system_prompt": ""}),
}


@pytest.mark.parametrize("route", API_ROUTES)
def test_api_views_answer_503_holding_no_connection_while_redis_is_dark(app, client, auth, pings, route):
    headers = auth.headers()  # a Bearer token: its lookup is the request's first read
    c, m, r = seed_exchange(app, "alice")
    before = stored(app)
    path, body = API_ROUTES[route]
    response = client.post(path.format(c=c, m=m, r=r), json=body, headers=headers)
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "replies_unavailable"
    assert response.headers["Retry-After"]
    assert pings == [0]  # the ping ran (and waited), and no connection was checked out
    assert stored(app) == before


@pytest.mark.parametrize("route", WEB_ROUTES)
def test_web_forms_answer_503_holding_no_connection_while_redis_is_dark(app, client, auth, pings, route):
    auth.register("alice", PASSWORD)
    logged_in = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert logged_in.status_code == 302  # the login's user is loaded by each request: its first read
    c, m, r = seed_exchange(app, "alice")
    before = stored(app)
    path, form = WEB_ROUTES[route]
    response = client.post(path.format(c=c, m=m, r=r), data=form)
    assert response.status_code == 503, response.get_data(as_text=True)
    assert "replies cannot be queued right now" in response.get_data(as_text=True).lower()
    assert pings == [0]
    assert stored(app) == before


@pytest.mark.parametrize("extra_config", [{"REPLY_WORKERS": 1, "REPLY_QUEUE_MAX": 0}], indirect=True)
def test_refused_and_failed_views_give_their_reserved_place_back(app, client, auth):
    # The in-process runner has one place: a view that ends without starting a reply (a
    # 404, a refused edit, a 422 form, a replay of an idempotent post) must not keep it.
    headers = auth.headers()
    c, m, r = seed_exchange(app, "alice")
    other, _m, _r = seed_exchange(app, "alice")
    api = "/api/v1/conversations"
    assert client.post(f"{api}/999999/messages", json={"content": "x"}, headers=headers).status_code == 404
    assert client.post(f"{api}/{c}/messages/{r}/edit", json={"content": "x"}, headers=headers).status_code == 422
    assert client.post(f"{api}/{other}/messages/{m}/regenerate", headers=headers).status_code == 404
    client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert client.post(f"/c/{c}/messages", data={"content": ""}).status_code == 422
    assert client.post("/chat/new", data={"content": ""}).status_code == 422
    first = client.post(f"{api}/{c}/messages", json={"content": "x"}, headers={**headers, "Idempotency-Key": "k"})
    assert first.status_code == 202, first.get_json()
    assert get_runner(app).wait_idle(30)
    replay = client.post(f"{api}/{c}/messages", json={"content": "x"}, headers={**headers, "Idempotency-Key": "k"})
    assert replay.status_code == 202
    # The one place is free: a reservation succeeds, and a second one is refused.
    held = get_runner(app).reserve()
    with pytest.raises(Exception, match="too many replies"):
        get_runner(app).reserve()
    held.release()
