"""Conversations in the browser: list, new, open, rename, delete, send, regenerate; someone else's is a 404."""

import re
import time

import pytest
import sqlalchemy as sa

from chatapp.chat.models import Conversation, Message, Status
from chatapp.db import unit_of_work
from tests.faults import commit_answer_lost, killed_at_commit
from tests.helpers import wait_for_background_work
from tests.web.conftest import count, seed_reply

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"


@pytest.fixture
def alice(web):
    web.register("alice")
    return web


def conversation_titles(html: str) -> list[str]:
    return re.findall(
        r'class="conversation-link" href="/c/\d+(?:\?older=[^"]*)?"\s*(?:aria-current="page")?>([^<]*)</a>', html
    )


# --- every page needs a login ------------------------------------------------------------------

LOGGED_IN_ROUTES = [
    ("get", "/"),
    ("get", "/chat/new"),
    ("post", "/chat/new"),
    ("get", "/c/1"),
    ("post", "/c/1/rename"),
    ("get", "/c/1/delete"),
    ("post", "/c/1/delete"),
    ("post", "/c/1/messages"),
    ("get", "/c/1/messages/2"),
    ("post", "/c/1/messages/2/regenerate"),
    ("post", "/c/1/messages/2/stop"),
    ("get", "/settings"),
    ("post", "/settings/tokens"),
    ("post", "/settings/tokens/1/revoke"),
    ("post", "/logout"),
]


@pytest.mark.parametrize(("method", "path"), LOGGED_IN_ROUTES)
def test_every_page_sends_strangers_to_the_login(client, app, web, method, path):
    web.register("alice")
    conversation_id, _reply_id = seed_reply(app, "alice", "hi", "hello")
    assert conversation_id == 1
    web.logout()
    response = getattr(client, method)(path, data={"title": "x", "content": "x", "name": "x"})
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")
    # Nothing was written for the stranger.
    assert count(app, Conversation) == 1
    assert count(app, Message) == 2
    with unit_of_work(app, write=False) as session:
        assert session.scalar(sa.select(Conversation.title)) == "New chat"


def test_a_conversation_starts_with_its_first_message_not_an_empty_form(client, app, alice):
    """No page posts an empty "new conversation" form: "New chat" opens /chat/new, which
    stores nothing until the first message (the API still makes empty ones)."""
    assert client.post("/c").status_code == 404
    assert count(app, Conversation) == 0
    assert 'href="/chat/new"' in client.get("/").get_data(as_text=True)


def test_login_and_register_pages_need_no_login(client):
    assert client.get("/login").status_code == 200
    assert client.get("/register").status_code == 200


# --- the list ------------------------------------------------------------------------------------


def test_empty_state_says_what_to_do(client, alice):
    html = client.get("/").get_data(as_text=True)
    assert "Start your first conversation" in html
    assert "No conversations yet." in html


def test_new_conversation_opens_it(client, app, alice):
    conversation_id = alice.new_conversation()
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert '<h1 class="chat-title" id="chat-title">New chat</h1>' in html
    assert "No messages yet." in html
    assert 'aria-current="page">New chat</a>' in html
    assert count(app, Conversation) == 1


def test_sidebar_lists_newest_first_in_pages(client, app, alice):
    app.config["WEB_CONVERSATIONS_PER_PAGE"] = 2
    for title in ["first", "second", "third"]:
        seed_reply(app, "alice", "hi", "hello", title=title)
    html = client.get("/").get_data(as_text=True)
    assert conversation_titles(html) == ["third", "second"]
    assert "Pick up where you left off" in html
    older = re.search(r'href="(/\?older=[^"]+)">Older</a>', html).group(1)
    html = client.get(older).get_data(as_text=True)
    assert conversation_titles(html) == ["first"]
    assert '<a href="/">Newest</a>' in html
    assert ">Older</a>" not in html


def test_bad_sidebar_cursor_is_a_clear_4xx(client, alice):
    response = client.get("/?older=not-a-cursor")
    assert response.status_code == 422
    assert "Cursor is not valid" in response.get_data(as_text=True)


def test_users_only_see_their_own_conversations(client, app, web):
    web.register("bob")
    seed_reply(app, "bob", "bob's question", "bob's answer", title="bob's secret")
    web.logout()
    web.register("alice")
    html = client.get("/").get_data(as_text=True)
    assert "bob&#39;s secret" not in html
    assert conversation_titles(html) == []


# --- a conversation ----------------------------------------------------------------------------------


def test_messages_are_escaped_and_replies_render_safe_markdown(client, app, alice):
    conversation_id, _ = seed_reply(
        app,
        "alice",
        f"{XSS_SCRIPT} and {XSS_IMG}",
        f"# Title\n\n- {XSS_IMG}\n- [click](javascript:alert(1))\n\n{XSS_SCRIPT}\n\n[docs](https://example.com)",
    )
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert XSS_SCRIPT not in html and XSS_IMG not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; and &lt;img src=x onerror=alert(1)&gt;" in html
    assert "<h3>Title</h3>" in html  # the reply's "# Title": the page keeps its one h1
    assert html.count("<h1") == 1
    assert '<a href="https://example.com" rel="noopener nofollow">docs</a>' in html
    assert 'href="javascript:' not in html


def test_send_a_message_without_javascript(client, app, alice):
    conversation_id = alice.new_conversation()
    response = client.post(f"/c/{conversation_id}/messages", data={"content": "hello there"})
    assert response.status_code == 302
    assert response.headers["Location"] == f"/c/{conversation_id}"
    wait_for_background_work(app)
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert re.search(r'<div class="text plain">hello there</div>', html)
    assert re.search(
        r'data-status="complete"[^>]*>\s*<div class="bubble">.*?<div class="text markdown"><p>hello there</p>',
        html,
        re.S,
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("   ", "Content must contain a visible character and no NUL characters."),
        ("x" * 32_001, "Content must be 1-32000 characters."),
        ("", "This field is required."),
    ],
)
def test_bad_message_is_a_4xx_on_the_page_and_writes_nothing(client, app, alice, content, message):
    conversation_id = alice.new_conversation()
    response = client.post(f"/c/{conversation_id}/messages", data={"content": content})
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)
    assert count(app, Message) == 0


def test_message_while_a_reply_is_written_is_refused(client, app, alice):
    conversation_id, reply_id = seed_reply(app, "alice", "first", "", finish=False)
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    # The page shows the reply as still being written, with the "thinking" indicator.
    assert re.search(rf'id="message-{reply_id}"\s+data-message-id="{reply_id}" data-status="pending"', html)
    assert '<p class="thinking">' in html
    assert "Regenerate" not in html
    response = client.post(f"/c/{conversation_id}/messages", data={"content": "second"})
    assert response.status_code == 409
    body = response.get_data(as_text=True)
    assert "The bot is still answering in this conversation; wait for the reply to finish or stop it." in body
    assert re.search(r">\s*second</textarea>", body)  # the draft is kept
    assert count(app, Message) == 2


def test_failed_reply_shows_its_error_and_regenerates(client, app, alice):
    conversation_id, reply_id = seed_reply(app, "alice", "try me", "half an ans", error="the model server is down")
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "The reply failed:</strong> the model server is down" in html
    assert f'action="/c/{conversation_id}/messages/{reply_id}/regenerate"' in html
    response = client.post(f"/c/{conversation_id}/messages/{reply_id}/regenerate")
    assert response.status_code == 302
    wait_for_background_work(app)
    with unit_of_work(app, write=False) as session:
        # A new version beside the failed one, which stays as it was.
        version = session.scalar(sa.select(Message).where(Message.id > reply_id))
        assert (version.status, version.content, version.error) == (Status.COMPLETE, "try me", None)
        assert session.get(Message, reply_id).status is Status.FAILED
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "the model server is down" not in html and ">2/2<" in html


# A commit whose connection died after COMMIT was sent, but which landed: the page goes
# on as if nothing happened, and the reply runs now rather than when the reaper fails it.
def test_send_whose_commit_landed_unseen_still_starts_its_reply(client, app, alice):
    conversation_id = alice.new_conversation()
    with commit_answer_lost(app, "INSERT INTO messages") as fault:
        response = client.post(f"/c/{conversation_id}/messages", data={"content": "hello there"})
    assert fault.fired == 1
    assert response.status_code == 302
    assert response.headers["Location"] == f"/c/{conversation_id}"
    wait_for_background_work(app)
    assert count(app, Message, Message.status == Status.COMPLETE, Message.content == "hello there") == 2


def test_send_whose_commit_fails_in_flight_is_a_503_page_and_stores_nothing(client, app, alice):
    conversation_id = alice.new_conversation()
    with killed_at_commit(app, "INSERT INTO messages") as fault:
        response = client.post(f"/c/{conversation_id}/messages", data={"content": "hello there"})
    assert fault.fired == 1
    assert response.status_code == 503
    assert "The database is unavailable; retry in a moment." in response.get_data(as_text=True)
    assert count(app, Message) == 0


def test_regenerate_whose_commit_landed_unseen_still_starts_the_new_attempt(client, app, alice):
    conversation_id, reply_id = seed_reply(app, "alice", "try me", "half", error="the model server is down")
    with commit_answer_lost(app, "UPDATE conversations") as fault:
        response = client.post(f"/c/{conversation_id}/messages/{reply_id}/regenerate")
    assert fault.fired == 1
    assert response.status_code == 302
    wait_for_background_work(app)
    with unit_of_work(app, write=False) as session:
        version = session.scalar(sa.select(Message).where(Message.id > reply_id))
        assert (version.status, version.content, version.attempt) == (Status.COMPLETE, "try me", 0)


def test_only_the_latest_reply_regenerates(client, app, alice):
    conversation_id, first_reply = seed_reply(app, "alice", "one", "1")
    client.post(f"/c/{conversation_id}/messages", data={"content": "two"})
    wait_for_background_work(app)
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert html.count('class="regenerate-form"') == 1
    response = client.post(f"/c/{conversation_id}/messages/{first_reply}/regenerate")
    assert response.status_code == 409
    assert "Only the latest reply in a conversation can be regenerated" in response.get_data(as_text=True)
    with unit_of_work(app, write=False) as session:
        assert session.get(Message, first_reply).attempt == 0


# --- stop a reply without JavaScript --------------------------------------------------------------

SLOW_BOT = {"BOT_ECHO_DELAY": 30, "REPLY_FLUSH_INTERVAL": 0.05, "REPLY_STOP_CHECK_SECONDS": 0.1}
WORDS = " ".join(f"word{n}" for n in range(60))


def stored_reply(app, reply_id) -> tuple[Status, str, str | None]:
    with unit_of_work(app, write=False) as session:
        reply = session.get(Message, reply_id)
        return reply.status, reply.content, reply.error


def wait_until_it_has_text(app, reply_id, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout  # a bound on a loaded machine, not a speed target
    while not stored_reply(app, reply_id)[1]:
        assert time.monotonic() < deadline, "the reply stored no text"
        time.sleep(0.02)


@pytest.mark.parametrize("extra_config", [SLOW_BOT], indirect=True)
def test_stop_a_running_reply_without_javascript(client, app, alice):
    conversation_id = alice.new_conversation()
    assert client.post(f"/c/{conversation_id}/messages", data={"content": WORDS}).status_code == 302
    reply_id = 2
    wait_until_it_has_text(app, reply_id)
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    # While it runs the page offers Stop (in <noscript>: with a script, the composer's button does it).
    stop_form = f'action="/c/{conversation_id}/messages/{reply_id}/stop"'
    assert re.search(rf"<noscript>.*?{re.escape(stop_form)}.*?>Stop</button>.*?</noscript>", html, re.S)

    response = client.post(f"/c/{conversation_id}/messages/{reply_id}/stop")
    assert response.status_code == 302
    assert response.headers["Location"] == f"/c/{conversation_id}"
    # The run ends at once (the echo bot would talk for 30 s) and writes nothing more.
    wait_for_background_work(app, timeout=5)
    status, content, error = stored_reply(app, reply_id)
    assert (status, error) == (Status.STOPPED, None)
    assert content and WORDS.startswith(content) and content != WORDS

    # The page shows the text so far, says it stopped, and offers Regenerate instead of Stop.
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert re.search(rf'id="message-{reply_id}"\s+data-message-id="{reply_id}" data-status="stopped"', html)
    assert f'<div class="text markdown"><p>{content.strip()}</p>' in html
    assert '<p class="message-note">Stopped</p>' in html
    assert f'action="/c/{conversation_id}/messages/{reply_id}/regenerate"' in html
    assert stop_form not in html and "That reply had already finished." not in html


def test_stopping_a_finished_reply_says_so_and_changes_nothing(client, app, alice):
    conversation_id, reply_id = seed_reply(app, "alice", "q", "the whole answer")
    response = client.post(f"/c/{conversation_id}/messages/{reply_id}/stop")
    assert response.status_code == 302
    assert response.headers["Location"] == f"/c/{conversation_id}"
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "That reply had already finished." in html
    assert "message-note" not in html
    assert stored_reply(app, reply_id) == (Status.COMPLETE, "the whole answer", None)
    # A user's message is not a reply.
    assert client.post(f"/c/{conversation_id}/messages/{reply_id - 1}/stop").status_code == 404


@pytest.mark.parametrize("extra_config", [{"WTF_CSRF_ENABLED": True}], indirect=True)
def test_the_stop_form_needs_the_pages_csrf_token(client, app, web):
    web.register("alice")
    conversation_id, reply_id = seed_reply(app, "alice", "q", "", finish=False)
    url = f"/c/{conversation_id}/messages/{reply_id}/stop"
    for data in ({}, {"csrf_token": "not-the-token"}):
        assert client.post(url, data=data).status_code == 400
    assert stored_reply(app, reply_id) == (Status.PENDING, "", None)
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    token = re.search(rf'action="{url}">\s*<input type="hidden" name="csrf_token" value="([^"]+)">', html).group(1)
    assert client.post(url, data={"csrf_token": token}).status_code == 302
    assert stored_reply(app, reply_id) == (Status.STOPPED, "", None)


def test_stopping_someone_elses_reply_is_a_404(client, app, web):
    web.register("alice")
    conversation_id, reply_id = seed_reply(app, "alice", "private", "", finish=False)
    web.logout()
    web.register("bob")
    response = client.post(f"/c/{conversation_id}/messages/{reply_id}/stop")
    assert response.status_code == 404
    assert stored_reply(app, reply_id) == (Status.PENDING, "", None)


def test_reply_fragment_is_the_rendered_reply(client, app, alice):
    conversation_id, reply_id = seed_reply(app, "alice", "q", "## Done\n\n`code` <b>bold?</b>")
    response = client.get(f"/c/{conversation_id}/messages/{reply_id}")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert html.lstrip().startswith("<li") or '<li class="message assistant"' in html
    assert "<h4>Done</h4>" in html and "<code>code</code>" in html
    assert "&lt;b&gt;bold?&lt;/b&gt;" in html
    assert "<html" not in html
    # A user's message is not a reply.
    assert client.get(f"/c/{conversation_id}/messages/{reply_id - 1}").status_code == 404


def test_long_history_opens_at_the_newest_messages(client, app, alice):
    app.config["WEB_MESSAGES_PER_PAGE"] = 4
    conversation_id, _ = seed_reply(app, "alice", "q1", "a1")
    with unit_of_work(app) as session:
        from chatapp.chat import services

        conversation = session.get(Conversation, conversation_id)
        for n in (2, 3):
            _m, reply = services.post_message(conversation, f"q{n}")
            services.finish_reply(reply.id, reply.attempt, f"a{n}")
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert re.findall(r'<div class="text plain">(q\d)</div>', html) == ["q2", "q3"]
    earlier = re.search(r'href="([^"]+before=\d+)">Show earlier messages</a>', html).group(1)
    html = client.get(earlier.replace("&amp;", "&")).get_data(as_text=True)
    assert re.findall(r'<div class="text plain">(q\d)</div>', html) == ["q1"]
    assert "Regenerate" not in html  # not the newest page: nothing here is the latest reply


# --- rename and delete -------------------------------------------------------------------------------


def test_rename(client, app, alice):
    conversation_id = alice.new_conversation()
    response = client.post(f"/c/{conversation_id}/rename", data={"title": "  Trip plans  "})
    assert response.headers["Location"] == f"/c/{conversation_id}"
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert '<h1 class="chat-title" id="chat-title">Trip plans</h1>' in html
    assert conversation_titles(html) == ["Trip plans"]


@pytest.mark.parametrize(
    ("title", "message"),
    [
        ("   ", "Title must contain a visible character and no NUL characters."),
        ("x" * 201, "Title must be 1-200 characters."),
        ("", "This field is required."),
    ],
)
def test_bad_title_is_a_4xx_on_the_page_and_writes_nothing(client, app, alice, title, message):
    conversation_id = alice.new_conversation()
    response = client.post(f"/c/{conversation_id}/rename", data={"title": title})
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert message in html
    assert '<details class="menu rename" open>' in html  # the form stays open with its error
    with unit_of_work(app, write=False) as session:
        assert session.get(Conversation, conversation_id).title == "New chat"


def test_delete_asks_first_then_deletes_everything(client, app, alice):
    conversation_id, _ = seed_reply(app, "alice", "q", "a", title="Old stuff")
    page = client.get(f"/c/{conversation_id}/delete")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "Delete “Old stuff”?" in html
    assert f'<form method="post" action="/c/{conversation_id}/delete">' in html
    assert count(app, Conversation) == 1  # asking deleted nothing

    response = client.post(f"/c/{conversation_id}/delete")
    assert response.headers["Location"] == "/"
    assert "Deleted “Old stuff”." in client.get("/").get_data(as_text=True)
    assert count(app, Conversation) == 0
    assert count(app, Message) == 0
    gone = client.get(f"/c/{conversation_id}")
    assert gone.status_code == 404
    assert "Page not found" in gone.get_data(as_text=True)


# --- someone else's conversation is not found ------------------------------------------------------------


def test_someone_elses_conversation_is_a_404_everywhere(client, app, web):
    web.register("alice")
    conversation_id, reply_id = seed_reply(app, "alice", "private", "secret answer", title="alice only")
    web.logout()
    web.register("bob")
    attempts = [
        client.get(f"/c/{conversation_id}"),
        client.get(f"/c/{conversation_id}/delete"),
        client.post(f"/c/{conversation_id}/delete"),
        client.post(f"/c/{conversation_id}/rename", data={"title": "mine now"}),
        client.post(f"/c/{conversation_id}/messages", data={"content": "hi"}),
        client.post(f"/c/{conversation_id}/messages/{reply_id}/regenerate"),
        client.get(f"/c/{conversation_id}/messages/{reply_id}"),
    ]
    for response in attempts:
        assert response.status_code == 404, response.request.path
        assert "alice only" not in response.get_data(as_text=True)
        assert "secret answer" not in response.get_data(as_text=True)
    # The page's API calls, with bob's cookie, are refused the same way.
    assert client.get(f"/api/v1/conversations/{conversation_id}").status_code == 404
    assert client.get(f"/api/v1/conversations/{conversation_id}/messages/{reply_id}/stream").status_code == 404
    with unit_of_work(app, write=False) as session:
        conversation = session.get(Conversation, conversation_id)
        assert conversation.title == "alice only"
        assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 2
        assert session.get(Message, reply_id).attempt == 0
