"""End to end in Debian's Chromium (Playwright) against gunicorn: register, chat with live replies, reload mid-reply, XSS, rename, delete, stop, retry, replies rendered while they stream.

No timed assertions: the page itself records every state the reply goes through (a
MutationObserver), and the test checks the sequence after the reply has finished.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from chatapp import create_app
from chatapp.auth import services as auth_services
from chatapp.chat import services as chat_services
from chatapp.chat.models import Conversation, Message, Status
from chatapp.db import db, unit_of_work
from chatapp.web.pages import date_group
from tests.conftest import base_test_config
from tests.support.servers import GunicornServer
from tests.web.browser import chromium_missing_reason, launch

pytestmark = pytest.mark.e2e

USERNAME, PASSWORD = "ada", "correct horse"
TIMEOUT_MS = 30_000  # an upper bound for a 2 s reply on a loaded machine, not a speed target

# Runs in every page before its own scripts: records each new state of the newest reply
# as the DOM changes, from the first parsed byte on.
RECORDER = """
window.__states = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll("#message-list li.message.assistant");
  const reply = replies[replies.length - 1];
  const box = document.getElementById("content");
  if (!reply || !box) return;
  const thinking = reply.querySelector(".thinking");
  const state = {
    status: reply.dataset.status,
    thinking: !!thinking && getComputedStyle(thinking).display !== "none",
    text: reply.querySelector(".text").textContent,
    boxDisabled: box.disabled,
    // While streaming, the reply is the server's sanitized rendering: never markup a message wrote.
    markup: reply.querySelector(".text :is(script, img, b, iframe, [onerror])") !== null,
  };
  const last = window.__states[window.__states.length - 1];
  if (!last || JSON.stringify(last) !== JSON.stringify(state)) window.__states.push(state);
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""

NEWEST_REPLY_STREAMING_WITH_TEXT = """() => {
  const replies = document.querySelectorAll("li.message.assistant");
  const reply = replies[replies.length - 1];
  return reply && reply.dataset.status === "streaming" && reply.querySelector(".text").textContent.length > 0;
}"""


@pytest.fixture(scope="module")
def browser():
    reason = chromium_missing_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture
def seeder(database_uri):
    """An app in the test process, to write fixtures straight through the services."""
    app = create_app(base_test_config(database_uri))
    yield app
    with app.app_context():
        db.engine.dispose()


def seed_conversation(app, title: str, exchanges: list[tuple[str, str, str | None]]) -> int:
    with unit_of_work(app):
        user = auth_services.find_user(USERNAME)
        conversation = chat_services.create_conversation(user.id, title)
        for question, answer, error in exchanges:
            _message, reply = chat_services.post_message(conversation, question)
            chat_services.finish_reply(reply.id, reply.attempt, answer, error)
        return conversation.id


def watch_for_problems(page) -> list[str]:
    """Dialogs (an alert() from injected markup), script errors, console errors (CSP violations)."""
    problems: list[str] = []

    def on_dialog(dialog):
        problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: message.type == "error" and problems.append(f"console: {message.text}"))
    return problems


def send(page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def newest_reply(page):
    return page.locator("li.message.assistant").last


def expect_finished(page, expect, text: str) -> None:
    reply = newest_reply(page)
    expect(reply).to_have_attribute("data-status", "complete", timeout=TIMEOUT_MS)
    expect(reply.locator(".text")).to_have_text(text)


def thinking_then_words(states: list[dict], final: str) -> list[str]:
    """The reply showed "thinking" (no text, box disabled), then only growing prefixes of ``final``."""
    start = next(
        (
            i
            for i, s in enumerate(states)
            if s == {"status": "pending", "thinking": True, "text": "", "boxDisabled": True, "markup": False}
        ),
        None,
    )
    assert start is not None, states
    after = states[start:]
    assert all(s["boxDisabled"] for s in after if s["status"] in ("pending", "streaming")), after
    assert all(not s["thinking"] for s in after if s["text"]), after
    assert not any(s["markup"] for s in after), after
    partial = [s["text"] for s in after if s["status"] == "streaming"]
    assert all(final.startswith(text) for text in partial), partial
    return partial


def test_chat_in_a_real_browser(browser, database_uri, seeder, tmp_path):
    from playwright.sync_api import expect

    config = {"BOT_ECHO_DELAY": 2}
    with GunicornServer(database_uri, workers=2, threads=8, config=config, log_dir=tmp_path) as server:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        context.add_init_script(RECORDER)
        page = context.new_page()
        problems = watch_for_problems(page)
        streams: list[str] = []
        page.on("request", lambda request: request.url.endswith("/stream") and streams.append(request.url))

        # Register: the pages run under the server's strict Content-Security-Policy.
        response = page.goto(server.url + "/register")
        policy = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy, policy
        page.get_by_label("Username").fill(USERNAME)
        page.get_by_label("Password", exact=True).fill(PASSWORD)
        page.get_by_label("Repeat password").fill(PASSWORD)
        page.get_by_role("button", name="Create account").click()
        expect(page.get_by_role("heading", name="Start your first conversation")).to_be_visible()

        # A new chat: its first message, sent with Enter, creates it; the bot titles it.
        page.get_by_role("link", name="New chat").first.click()
        expect(page).to_have_url(re.compile(r"/chat/new$"))
        # The page script is deferred: until it has run, Enter only adds a new line.
        page.wait_for_load_state("load")
        send(page, "First words here")
        expect(page).to_have_url(re.compile(r"/c/\d+$"))
        page.wait_for_load_state("load")
        expect_finished(page, expect, "First words here")
        expect(page.locator("#chat-title")).to_have_text("First words here")
        streams.clear()  # whether the first reply was still running when its page opened varies

        # A message sent with Enter in the conversation.
        page.evaluate("window.__states = []")
        message = "one two three four five six seven eight"
        send(page, message)
        expect_finished(page, expect, message)
        partial = thinking_then_words(page.evaluate("window.__states"), message)
        assert len(set(partial)) >= 2, partial  # more than one step
        box = page.get_by_label("Message", exact=True)
        expect(box).to_be_enabled()
        expect(box).to_be_focused()
        expect(page.locator("#chat-status")).to_have_text("The reply is complete.")  # for screen readers
        expect(page.locator("li.message.user .text").last).to_have_text(message)

        # Shift+Enter is a new line; markup in messages is shown as text and runs nothing.
        # (The last line has no spaces, so the echo bot streams it as one chunk.)
        lines = [
            "<script>alert(1)</script>",
            "<img src=x onerror=alert(1)>",
            '<b>b</b><img/src="x"/onerror="alert(2)">',
        ]
        xss = "\n".join(lines)
        for number, line in enumerate(lines):
            if number:
                box.press("Shift+Enter")
            box.press_sequentially(line)
        assert box.input_value() == xss
        assert page.locator("li.message").count() == 4  # nothing sent yet
        page.evaluate("window.__states = []")
        box.press("Enter")
        expect(newest_reply(page)).to_have_attribute("data-status", "complete", timeout=TIMEOUT_MS)
        expect(page.locator("li.message.user .text").last).to_have_text(xss)
        for line in lines:
            expect(newest_reply(page).locator(".text")).to_contain_text(line)
        assert page.locator("#message-list img, #message-list script, #message-list b").count() == 0
        thinking_then_words(page.evaluate("window.__states"), xss)
        page.reload()  # and once more as the server renders it
        expect(page.locator("li.message.user .text").last).to_have_text(xss)
        assert page.locator("#message-list img, #message-list script").count() == 0

        # Reload while the reply is being written: the page picks the stream up again.
        long_message = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
        send(page, long_message)
        page.wait_for_function(NEWEST_REPLY_STREAMING_WITH_TEXT)
        reloaded = page.reload()
        assert re.search(r'data-status="(pending|streaming)"', reloaded.text()), "the reply ended before the reload"
        expect(newest_reply(page)).to_have_attribute("aria-busy", "true")
        expect_finished(page, expect, long_message)
        # Resumed, not repeated: the reloaded page only ever shows a prefix of the reply.
        resumed = [s["text"] for s in page.evaluate("window.__states") if s["status"] == "streaming"]
        assert resumed and all(long_message.startswith(text) for text in resumed), resumed
        expect(page.get_by_label("Message", exact=True)).to_be_enabled()

        # A failed reply shows its error and a Regenerate button that streams a new attempt.
        failed = seed_conversation(seeder, "Flaky model", [("try again", "half", "the model server is down")])
        page.goto(f"{server.url}/c/{failed}")
        expect(page.get_by_text("The reply failed: the model server is down")).to_be_visible()
        page.evaluate("window.__states = []")
        page.get_by_role("button", name="Regenerate").click()
        expect_finished(page, expect, "try again")
        thinking_then_words(page.evaluate("window.__states"), "try again")
        expect(page.get_by_text("The reply failed")).to_have_count(0)

        # A long history opens at the newest message.
        long_history = seed_conversation(
            seeder, "Long history", [(f"question {n}", f"answer {n}", None) for n in range(1, 31)]
        )
        page.goto(f"{server.url}/c/{long_history}")
        expect(page.locator("li.message").last).to_be_in_viewport()
        expect(page.locator("li.message").first).not_to_be_in_viewport()

        # Rename and delete the first conversation.
        page.get_by_role("link", name="First words here", exact=True).click()
        page.get_by_text("Rename", exact=True).click()
        page.get_by_label("Title").fill("Counting words")
        page.get_by_role("button", name="Save").click()
        expect(page.get_by_role("heading", name="Counting words")).to_be_visible()
        expect(page.get_by_role("link", name="Counting words")).to_have_attribute("aria-current", "page")
        page.get_by_role("link", name="Delete").click()
        expect(page.get_by_role("heading", name="Delete “Counting words”?")).to_be_visible()
        page.get_by_role("button", name="Delete conversation").click()
        expect(page).to_have_url(server.url + "/")
        expect(page.get_by_text("Deleted “Counting words”.")).to_be_visible()
        expect(page.get_by_role("link", name="Counting words")).to_have_count(0)

        # Keyboard: the first Tab lands on the skip link, with a visible focus ring.
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "() => [document.activeElement.textContent, getComputedStyle(document.activeElement).outlineStyle]"
        )
        assert focused == ["Skip to content", "solid"], focused

        assert problems == []
        # One stream per reply, two for the reloaded one: each EventSource was closed at
        # "done" (an open one reconnects every second, long before the test gets here).
        assert len(streams) == 5, streams
        # The policy is really enforced: an injected inline script does not run.
        page.evaluate("""() => { const s = document.createElement("script");
                                 s.textContent = "window.__inline = 1"; document.head.append(s); }""")
        assert page.evaluate("window.__inline") is None
        assert any("Content Security Policy" in problem for problem in problems), problems
        context.close()


# Layout only: one database is enough.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_phone_width_and_dark_mode(browser, database_uri, seeder, tmp_path):
    from playwright.sync_api import expect

    with GunicornServer(database_uri, workers=1, threads=4, log_dir=tmp_path) as server:
        with unit_of_work(seeder):
            auth_services.create_user(USERNAME, PASSWORD)
        seed_conversation(
            seeder,
            "A rather long conversation title that will not fit on a phone",
            [("```\n" + "x" * 200 + "\n```", "```\n" + "y" * 200 + "\n```", None)],
        )
        context = browser.new_context(
            viewport={"width": 375, "height": 700}, is_mobile=True, has_touch=True, color_scheme="dark"
        )
        page = context.new_page()
        problems = watch_for_problems(page)
        page.goto(server.url + "/login")
        page.get_by_label("Username").fill(USERNAME)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        # On a phone the home page is the list itself.
        expect(page.get_by_role("link", name=re.compile("A rather long"))).to_be_visible()
        page.get_by_role("link", name=re.compile("A rather long")).click()
        expect(page.get_by_label("Message", exact=True)).to_be_visible()
        expect(page.get_by_role("button", name="Send")).to_be_visible()
        expect(page.get_by_role("link", name="Chats")).to_be_visible()  # the way back to the list
        expect(page.locator(".sidebar")).to_be_hidden()
        # The header's actions are icons that keep their names, and leave the title most of the
        # width: more than half of the screen, not a few letters and an ellipsis.
        expect(page.get_by_role("link", name="Delete")).to_be_visible()
        expect(page.locator("summary", has_text="Rename")).to_be_visible()
        expect(page.locator("summary", has_text="Model")).to_be_visible()
        title_width = page.locator("#chat-title").evaluate("title => title.getBoundingClientRect().width")
        assert title_width > 375 / 2, title_width
        # Nothing wider than the screen: long titles and code scroll inside their own boxes.
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        # Dark mode follows the system setting.
        dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
        page.emulate_media(color_scheme="light")
        light = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (dark, light) == ("rgb(21, 23, 27)", "rgb(255, 255, 255)")
        assert problems == []
        context.close()


# --- stop a reply, and a lost answer retried ---------------------------------------------------

# A reply of 40 words over 20 s: clearly mid-reply when the test stops it.
SLOW_BOT = {"BOT_ECHO_DELAY": 20, "REPLY_FLUSH_INTERVAL": 0.05, "REPLY_STOP_CHECK_SECONDS": 0.1}
WORDS = " ".join(f"word{n}" for n in range(40))

NEWEST_REPLY_HAS_THREE_WORDS = """() => {
  const replies = document.querySelectorAll("li.message.assistant");
  const reply = replies[replies.length - 1];
  return reply && reply.querySelector(".text").textContent.trim().split(/\\s+/).length >= 3;
}"""


def log_in(page, url: str) -> None:
    page.goto(url + "/login")
    page.get_by_label("Username").fill(USERNAME)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(url + "/")


def open_new_conversation(page, seeder, url: str) -> int:
    """A fresh conversation of the seeded user, open and ready to send (its script has run)."""
    with unit_of_work(seeder):
        conversation_id = chat_services.create_conversation(auth_services.find_user(USERNAME).id).id
    page.goto(f"{url}/c/{conversation_id}")
    page.wait_for_load_state("load")
    return conversation_id


def stored_reply(app, reply_id: int) -> tuple[Status, str]:
    with unit_of_work(app, write=False) as session:
        reply = session.get(Message, reply_id)
        return reply.status, reply.content


@pytest.mark.parametrize("how", ["button", "escape"])
def test_stop_a_reply_in_a_real_browser(browser, database_uri, seeder, tmp_path, how):
    from playwright.sync_api import expect

    with GunicornServer(database_uri, workers=2, threads=8, config=SLOW_BOT, log_dir=tmp_path) as server:
        with unit_of_work(seeder):
            auth_services.create_user(USERNAME, PASSWORD)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        context.add_init_script(RECORDER)
        page = context.new_page()
        problems = watch_for_problems(page)
        stops: list[str] = []
        page.on("request", lambda request: request.url.endswith("/stop") and stops.append(request.method))
        log_in(page, server.url)
        open_new_conversation(page, seeder, server.url)

        # While the reply is written, Send is Stop (same place) and the box is disabled.
        send(page, WORDS)
        stop = page.get_by_role("button", name="Stop", exact=True)
        expect(stop).to_be_enabled()
        expect(page.get_by_role("button", name="Send", exact=True)).to_have_count(0)
        box = page.get_by_label("Message", exact=True)
        expect(box).to_be_disabled()
        page.wait_for_function(NEWEST_REPLY_HAS_THREE_WORDS)
        if how == "button":
            stop.click()
        else:
            # Escape first closes an open menu, and only that: Rename's, the Model menu's...
            page.get_by_text("Rename", exact=True).click()
            expect(page.get_by_label("Title")).to_be_focused()
            page.keyboard.press("Escape")
            expect(page.locator("details.rename")).not_to_have_attribute("open", "")
            page.locator("details.chat-settings > summary").click()
            expect(page.locator("details.chat-settings")).to_have_attribute("open", "")
            page.keyboard.press("Escape")
            expect(page.locator("details.chat-settings")).not_to_have_attribute("open", "")
            # (Stopping disables the button at once, before the request goes out.)
            expect(stop).to_be_enabled()
            expect(newest_reply(page)).to_have_attribute("data-status", "streaming")
            # ...then, with nothing open, it stops the reply (focus on the menu's button).
            page.keyboard.press("Escape")

        # The reply ends as the server stored it: the text so far, a note, Regenerate.
        reply = newest_reply(page)
        expect(reply).to_have_attribute("data-status", "stopped", timeout=TIMEOUT_MS)
        expect(reply.locator(".message-note")).to_have_text("Stopped")
        expect(reply.get_by_role("button", name="Regenerate")).to_be_visible()
        expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()
        expect(stop).to_have_count(0)
        expect(box).to_be_enabled()
        expect(box).to_be_focused()
        expect(page.locator("#chat-status")).to_have_text("The reply was stopped.")  # for screen readers
        status, content = stored_reply(seeder, int(reply.get_attribute("data-message-id")))
        assert status is Status.STOPPED
        assert content and WORDS.startswith(content) and content != WORDS, content
        expect(reply.locator(".text")).to_have_text(content.strip())
        # Only ever growing prefixes of the echo, the box disabled throughout.
        thinking_then_words(page.evaluate("window.__states"), WORDS)
        assert stops == ["POST"]
        assert problems == []
        context.close()


# Page logic only: one database is enough.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_reply_page_logged_out_from_another_browser_says_so(browser, database_uri, seeder, tmp_path):
    from playwright.sync_api import expect

    with GunicornServer(database_uri, workers=2, threads=8, config=SLOW_BOT, log_dir=tmp_path) as server:
        with unit_of_work(seeder):
            auth_services.create_user(USERNAME, PASSWORD)
        chatting = browser.new_context(viewport={"width": 1280, "height": 800})
        chatting.set_default_timeout(TIMEOUT_MS)
        page = chatting.new_page()
        problems = watch_for_problems(page)
        log_in(page, server.url)
        open_new_conversation(page, seeder, server.url)
        send(page, WORDS)
        page.wait_for_function(NEWEST_REPLY_HAS_THREE_WORDS)
        # Another browser of the same user logs out everywhere while the reply streams.
        other = browser.new_context()
        other.set_default_timeout(TIMEOUT_MS)
        settings = other.new_page()
        log_in(settings, server.url)
        settings.goto(server.url + "/settings")
        settings.get_by_role("button", name="Log out everywhere").click()
        other.close()
        # The stream ends within seconds, and the page says why instead of hanging busy.
        expect(page.locator("#chat-status")).to_have_text("You were logged out.")
        expect(newest_reply(page).locator(".message-error")).to_have_text(
            "You were logged out. Log in again to see this reply."
        )
        expect(page.get_by_role("button", name="Stop", exact=True)).to_have_count(0)
        assert problems == []
        chatting.close()


# Page logic only: one database is enough.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_lost_answer_is_sent_again_once_with_the_same_key(browser, database_uri, seeder, tmp_path):
    from playwright.sync_api import expect

    with GunicornServer(database_uri, workers=1, threads=8, log_dir=tmp_path) as server:
        with unit_of_work(seeder):
            auth_services.create_user(USERNAME, PASSWORD)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        log_in(page, server.url)
        conversation_id = open_new_conversation(page, seeder, server.url)
        posts: list[dict] = []
        # How each POST of a message fares, in turn: "lost" reaches the server but its
        # answer does not reach the page; "503" and "down" never reach the server.
        fates: list[str] = []

        def on_post(route):
            request = route.request
            if request.method != "POST":
                return route.fallback()
            posts.append({"key": request.headers.get("idempotency-key"), "body": request.post_data})
            fate = fates.pop(0) if fates else "ok"
            if fate == "503":
                return route.fulfill(
                    status=503, json={"error": {"code": "database_unavailable", "message": "retry in a moment"}}
                )
            if fate == "down":
                return route.abort("connectionrefused")
            response = route.fetch()
            return route.abort("connectionreset") if fate == "lost" else route.fulfill(response=response)

        page.route(f"**/api/v1/conversations/{conversation_id}/messages", on_post)

        # Stored, but the answer was lost: the retry gets the same message back, not a copy.
        fates[:] = ["lost"]
        send(page, "first try")
        expect_finished(page, expect, "first try")
        # Then the database was briefly unavailable: the retry sends it.
        fates[:] = ["503"]
        send(page, "second try")
        expect_finished(page, expect, "second try")
        expect(page.locator("li.message")).to_have_count(4)
        first, retried, second, second_retried = posts
        assert first == retried and second == second_retried, posts
        assert first["key"] != second["key"] and all(len(post["key"]) == 36 for post in posts)
        page.reload()
        expect(page.locator("li.message.user .text")).to_have_text(["first try", "second try"])

        # Still no answer on the second try: one retry only, then the error, draft kept.
        fates[:] = ["down", "down"]
        send(page, "third try")
        expect(page.locator("#composer-error")).to_have_text(
            "Could not reach the server. Check your connection and try again."
        )
        assert len(posts) == 6 and posts[4] == posts[5]
        box = page.get_by_label("Message", exact=True)
        expect(box).to_have_value("third try")
        expect(box).to_be_enabled()
        # Sending the same draft again reuses its key (it may have been stored after all).
        box.press("Enter")
        expect_finished(page, expect, "third try")
        assert len(posts) == 7 and posts[6] == posts[5]
        with unit_of_work(seeder, write=False) as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(Message)) == 6
        context.close()


# --- the chat page's furniture: groups, copy, focus, the limit, menus, phones -------------------------

UI_USER = "margaret.hamilton"  # longer than the sidebar used to show whole at 1280 px
# Hours before now of the sidebar's entries: a timezone 14 hours ahead of UTC moves some of
# them to another day than the server's UTC groups have them on.
UI_AGES_HOURS = [2, 13, 26, 75, 240, 1080, 9600]


def seed_ui(app) -> tuple[int, list[datetime]]:
    """UI_USER's conversations of several ages, the newest with a Markdown reply; its id and the times."""
    now = datetime.now(UTC)
    stamps = [now - timedelta(hours=hours) for hours in UI_AGES_HOURS]
    with unit_of_work(app) as session:
        user = auth_services.create_user(UI_USER, PASSWORD)
        ids = []
        for number, _stamp in enumerate(stamps):
            conversation = chat_services.create_conversation(user.id, f"Chat {number}")
            _message, reply = chat_services.post_message(conversation, f"question {number}")
            chat_services.finish_reply(reply.id, reply.attempt, f"**answer** {number}\n\n- one\n- two")
            ids.append(conversation.id)
        for conversation_id, stamp in zip(ids, stamps, strict=True):
            session.execute(sa.update(Conversation).where(Conversation.id == conversation_id).values(updated_at=stamp))
    return ids[0], stamps


# Layout and page logic only: one database is enough.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_chat_page_details_in_a_real_browser(browser, database_uri, seeder, tmp_path):
    from playwright.sync_api import expect

    newest, stamps = seed_ui(seeder)
    zone = "Pacific/Kiritimati"  # UTC+14
    local_today = datetime.now(ZoneInfo(zone)).date()
    expected_groups: list[str] = []
    for stamp in stamps:
        label = date_group(stamp.astimezone(ZoneInfo(zone)).date(), local_today)
        if not expected_groups or expected_groups[-1] != label:
            expected_groups.append(label)

    with GunicornServer(
        database_uri, workers=1, threads=8, config={"MESSAGE_MAX_LENGTH": 50}, log_dir=tmp_path
    ) as server:
        context = browser.new_context(
            viewport={"width": 1280, "height": 800},
            timezone_id=zone,
            permissions=["clipboard-read", "clipboard-write"],
        )
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        problems = watch_for_problems(page)
        posts: list[str] = []
        page.on("request", lambda request: request.method == "POST" and posts.append(request.url))
        page.goto(server.url + "/login")
        page.get_by_label("Username").fill(UI_USER)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(server.url + "/")

        # The sidebar groups by the browser's dates, not the server's.
        expect(page.locator("#conversation-list")).to_have_attribute("data-grouped", "local")
        expect(page.locator(".group-label")).to_have_text(expected_groups)
        expect(page.locator(".conversation-link")).to_have_text([f"Chat {n}" for n in range(len(stamps))])
        # The whole username shows at 1280 px.
        whoami = page.locator(".whoami")
        expect(whoami).to_contain_text(UI_USER)
        assert whoami.evaluate("node => node.scrollWidth <= node.clientWidth"), "the username is cut short"

        # A chat opens ready to type.
        page.get_by_role("link", name="Chat 0").click()
        page.wait_for_url(f"{server.url}/c/{newest}")
        page.wait_for_load_state("load")
        box = page.get_by_label("Message", exact=True)
        expect(box).to_be_focused()

        # Copy takes a reply's Markdown as written, and a message's text.
        reply = newest_reply(page)
        reply.hover()
        copy = reply.get_by_role("button", name="Copy")
        expect(copy).to_be_visible()
        copy.click()
        expect(reply.locator("[data-copy-message]")).to_have_attribute("data-copied", "true")
        assert page.evaluate("navigator.clipboard.readText()") == "**answer** 0\n\n- one\n- two"
        question = page.locator("li.message.user").last
        question.hover()
        question.get_by_role("button", name="Copy").click()
        assert page.evaluate("navigator.clipboard.readText()") == "question 0"
        # The row is reachable by keyboard: Tab onto Copy, then Regenerate.
        expect(reply.get_by_role("button", name="Regenerate")).to_have_count(1)

        # The counter appears near the limit; over it, the message says so and nothing is sent.
        posts.clear()
        counter = page.locator("#composer-counter")
        box.fill("x" * 20)
        expect(counter).to_be_hidden()
        box.fill("x" * 46)
        expect(counter).to_have_text("46 / 50 characters")
        box.fill("y" * 55)
        expect(counter).to_have_text("55 / 50 characters: 5 over the limit")
        box.press("Enter")
        expect(page.locator("#composer-error")).to_have_text(
            "Your message is 5 characters too long (the limit is 50). Shorten it or split it into several messages."
        )
        expect(box).to_have_value("y" * 55)  # never cut
        assert posts == []

        # An entry's menu: Delete asks in a dialog; Cancel keeps it, Delete deletes it.
        entry = page.locator("li.conversation-item", has_text="Chat 6")
        entry.hover()
        entry.get_by_label("Options for Chat 6").click()
        entry.get_by_role("link", name="Delete…").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("Delete “Chat 6”?")
        dialog.get_by_role("button", name="Cancel").click()
        expect(dialog).to_be_hidden()
        entry.get_by_label("Options for Chat 6").click()
        entry.get_by_role("link", name="Delete…").click()
        dialog.get_by_role("button", name="Delete").click()
        expect(page.get_by_text("Deleted “Chat 6”.")).to_be_visible()
        expect(page.get_by_role("link", name="Chat 6")).to_have_count(0)
        assert problems == []
        context.close()

        # On a phone the rename pop-over fits the screen.
        phone = browser.new_context(viewport={"width": 375, "height": 700}, is_mobile=True, has_touch=True)
        phone.set_default_timeout(TIMEOUT_MS)
        page = phone.new_page()
        problems = watch_for_problems(page)
        page.goto(server.url + "/login")
        page.get_by_label("Username").fill(UI_USER)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(server.url + "/")
        page.goto(f"{server.url}/c/{newest}")
        page.locator("summary", has_text="Rename").click()  # an icon here, named Rename
        title = page.get_by_label("Title")
        expect(title).to_be_visible()
        panel = page.locator("details.rename .menu-panel").bounding_box()
        assert panel and panel["x"] >= 0 and panel["x"] + panel["width"] <= 375, panel
        # Touch screens show the action row without hovering.
        assert newest_reply(page).locator(".message-actions").evaluate("node => getComputedStyle(node).opacity") == "1"
        assert problems == []
        phone.close()


# --- a reply reads the same while it streams -----------------------------------------------------

# Runs in every page before its own scripts: each new look of the newest reply as it streams.
RENDER_RECORDER = """
window.__looks = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll("#message-list li.message.assistant");
  const reply = replies[replies.length - 1];
  if (!reply) return;
  const text = reply.querySelector(".text");
  const code = text.querySelector(".code-block");
  const look = {
    status: reply.dataset.status,
    text: text.textContent,
    strong: text.querySelector("strong") !== null,
    highlighted: text.querySelector("pre.highlight span.k") !== null,
    language: code ? code.querySelector(".code-lang").textContent : null,
    copy: code ? code.querySelector("button.code-copy") !== null : false,
    codeHeight: code ? code.getBoundingClientRect().height : null,
    math: text.querySelector("math") !== null,
  };
  const last = window.__looks[window.__looks.length - 1];
  if (!last || JSON.stringify(last) !== JSON.stringify(look)) window.__looks.push(look);
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""

MARKDOWN_MESSAGE = (
    "Some **very bold words** first,\nand a line of its own.\n\n"
    "```python\ndef add(a, b):\n    return a + b\n```\n\n"
    "Then $x^2$ and " + " ".join(f"word{n}" for n in range(24))
)


# Page logic only: one database is enough.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_streaming_reply_is_rendered_as_it_will_be_when_finished(browser, database_uri, seeder, tmp_path):
    from playwright.sync_api import expect

    config = {"BOT_ECHO_DELAY": 6, "REPLY_FLUSH_INTERVAL": 0.05}
    with GunicornServer(database_uri, workers=1, threads=8, config=config, log_dir=tmp_path) as server:
        with unit_of_work(seeder):
            auth_services.create_user(USERNAME, PASSWORD)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        context.add_init_script(RENDER_RECORDER)
        page = context.new_page()
        problems = watch_for_problems(page)
        renders: list[str] = []
        page.on("request", lambda request: request.url.endswith("/text") and renders.append(request.url))
        log_in(page, server.url)
        open_new_conversation(page, seeder, server.url)

        send(page, MARKDOWN_MESSAGE)
        reply = newest_reply(page)
        expect(reply).to_have_attribute("data-status", "complete", timeout=TIMEOUT_MS)
        looks = page.evaluate("window.__looks")
        streaming = [look for look in looks if look["status"] == "streaming" and look["text"]]
        # Before the reply was complete, the page already showed bold text and highlighted
        # code under its language, with its Copy button...
        assert any(look["strong"] for look in streaming), streaming
        early = [look for look in streaming if look["highlighted"]]
        assert early and all(look["language"] == "python" and look["copy"] for look in early), streaming
        assert any(look["math"] for look in streaming), streaming
        # ...and never the raw Markdown: no "**", no fence, no "$" while it streamed.
        assert not any("**" in look["text"] or "```" in look["text"] or "$" in look["text"] for look in streaming)
        # The finished reply swapped in without moving the code block: only new text.
        final = looks[-1]
        assert final["status"] == "complete" and final["strong"] and final["highlighted"] and final["math"]
        assert final["codeHeight"] == early[-1]["codeHeight"], (early[-1], final)
        assert final["text"].startswith(early[-1]["text"].rstrip()), (early[-1]["text"], final["text"])
        # Renderings were asked for one at a time as text came, not once per word.
        assert 1 <= len(renders) < len(MARKDOWN_MESSAGE.split()), renders

        # Copy on the code block copies the code as written.
        reply.locator("button.code-copy").click()
        expect(reply.locator("button.code-copy")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == "def add(a, b):\n    return a + b\n"
        # The reply's own Copy button copies its Markdown as written.
        reply.locator("[data-copy-message]").click()
        expect(reply.locator("[data-copy-message]")).to_have_attribute("data-copied", "true")
        assert page.evaluate("navigator.clipboard.readText()") == MARKDOWN_MESSAGE

        # A reload shows the finished reply the same way, its Copy button added by the page.
        page.reload()
        expect(newest_reply(page).locator("pre.highlight span.k").first).to_have_text("def")
        expect(newest_reply(page).locator("button.code-copy")).to_have_count(1)
        assert problems == []
        context.close()


# What a message's row of actions holds, in order: the names of its parts.
ACTIONS = ".message-actions :is(nav, a, button)"
ACTION_NAMES = "nodes => nodes.map(node => node.getAttribute('aria-label'))"


# Page logic only: one database is enough.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_edit_a_message_and_switch_between_versions(browser, database_uri, seeder, tmp_path):
    from playwright.sync_api import expect

    with GunicornServer(database_uri, workers=1, threads=8, log_dir=tmp_path) as server:
        with unit_of_work(seeder):
            auth_services.create_user(USERNAME, PASSWORD)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        problems = watch_for_problems(page)
        log_in(page, server.url)
        conversation_id = seed_conversation(seeder, "Versions", [("first try", "first answer", None)])
        page.goto(f"{server.url}/c/{conversation_id}")
        page.wait_for_load_state("load")
        # Edit in place: the new version and its reply stream in, the old branch leaves the page.
        page.locator("li.message.user").get_by_role("link", name="Edit").click()
        page.get_by_label("Edit message").fill("second try")
        page.get_by_role("button", name="Save").click()
        expect_finished(page, expect, "second try")  # the echo bot
        expect(page.locator("li.message .text")).to_have_text(["second try", "second try"])
        expect(page.locator("li.message.user .version-position")).to_have_text("2/2")
        # The new version, added by the script, has the row a rendered message has, its Edit
        # pointing at its own form.
        added = page.locator("li.message.user")
        added_id = added.get_attribute("data-message-id")
        edit = added.get_by_role("link", name="Edit")
        expect(edit).to_have_attribute("href", f"/c/{conversation_id}/messages/{added_id}/edit")
        added_row = added.locator(ACTIONS).evaluate_all(ACTION_NAMES)
        page.reload()
        page.wait_for_load_state("load")
        rendered_row = page.locator("li.message.user").locator(ACTIONS).evaluate_all(ACTION_NAMES)
        assert added_row == rendered_row
        assert rendered_row == ["Versions of this message", "Previous version", "Next version", "Copy", "Edit"]
        # ‹ goes back to the first version and its reply, as they were.
        page.get_by_role("button", name="Previous version").click()
        page.wait_for_url(re.compile(rf".*/c/{conversation_id}#message-\d+$"))
        expect(page.locator("li.message .text")).to_have_text(["first try", "first answer"])
        expect(page.locator("li.message.user .version-position")).to_have_text("1/2")
        assert problems == []
        context.close()


# Page logic only: one database is enough.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_new_chat_is_created_by_its_first_message_with_its_model(browser, database_uri, seeder, tmp_path):
    """ "New chat" stores nothing; the first message creates the chat with the chosen model
    and system prompt; the reply shows its model and the generated title appears unreloaded."""
    from playwright.sync_api import expect

    with GunicornServer(database_uri, workers=1, threads=8, config={"BOT_ECHO_DELAY": 1}, log_dir=tmp_path) as server:
        with unit_of_work(seeder):
            auth_services.create_user(USERNAME, PASSWORD)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        problems = watch_for_problems(page)
        log_in(page, server.url)
        for _ in range(3):
            page.get_by_role("link", name="New chat").first.click()
            page.wait_for_url(server.url + "/chat/new")
        expect(page.locator(".conversation-link")).to_have_count(0)
        page.get_by_label("Model").select_option("")
        page.get_by_text("System prompt (optional)").click()
        page.get_by_label("System prompt").fill("Be brief.")
        box = page.get_by_label("Message", exact=True)
        box.fill("Plan a picnic by the river")
        box.press("Enter")
        page.wait_for_url(re.compile(r".*/c/\d+$"))
        expect_finished(page, expect, "Plan a picnic by the river")
        expect(newest_reply(page).locator(".message-model")).to_have_text("Model: echo")
        # The echo engine's title: the first words of the first message, shown without a reload.
        expect(page.locator("#chat-title")).to_have_text("Plan a picnic by the river")
        expect(page.locator(".conversation-link")).to_have_text(["Plan a picnic by the river"])
        with unit_of_work(seeder, write=False) as session:
            (conversation,) = session.scalars(sa.select(chat_services.Conversation)).all()
            assert (conversation.system_prompt, conversation.model, conversation.title_source) == (
                "Be brief.",
                None,
                "auto",
            )
        assert problems == []
        context.close()
