"""Take the README's screenshots of the browser UI from a real server in headless Chromium.

    python docs/screenshots.py            # writes docs/screenshots/*.png
    python docs/screenshots.py /tmp/shots # or elsewhere, to look before committing

Seeds a throwaway SQLite database through the services (one short unit of work), serves
it with gunicorn, and drives Debian's Chromium with Playwright: light, dark, phone width.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from chatapp import create_app  # noqa: E402
from chatapp.auth import services as auth  # noqa: E402
from chatapp.chat import services as chat  # noqa: E402
from chatapp.chat.models import Conversation, Message  # noqa: E402
from chatapp.db import db, unit_of_work  # noqa: E402
from tests.support.databases import migrate  # noqa: E402
from tests.support.servers import GunicornServer  # noqa: E402
from tests.web.browser import launch  # noqa: E402

OUT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT / "docs" / "screenshots"
USERNAME, PASSWORD = "ada", "correct horse battery"

MARKDOWN_REPLY = """Here is a small plan for **Lisbon**:

## Day one
1. Walk up to the *Castelo de São Jorge* in the morning.
2. Tram 28 through Alfama.
3. Sunset at the Miradouro da Senhora do Monte.

## Packing list
- comfortable shoes
- a light jacket for the evening wind

Opening hours are easy to check in code, too:

```python
def is_open(hour: int) -> bool:
    return 9 <= hour < 21
```

A day's budget, roughly: $b = 3 \\times 25 + 40$ euros.

More ideas on [visitlisboa.com](https://www.visitlisboa.com)."""
FIRST_VERSION = "Lisbon in a weekend: the castle, tram 28 and a sunset viewpoint."

HISTORY = [
    ("Weekend in Lisbon", "Plan a relaxed weekend in Lisbon for me.", MARKDOWN_REPLY),
    (
        "Sourdough starter",
        "How often should I feed a sourdough starter?",
        "Once a day at room temperature, or once a week if it lives in the fridge.",
    ),
    (
        "SQL window functions",
        "Explain ROW_NUMBER() in one sentence.",
        "`ROW_NUMBER()` numbers the rows of each partition in the order you give it, starting at 1.",
    ),
    (
        "Rainy day in Porto",
        "Anything to do in Porto when it rains?",
        "The **Livraria Lello** bookshop, the *Serralves* museum, and a port wine cellar tour.",
    ),
    (
        "Birthday gift ideas",
        "Gift ideas for a friend who likes hiking?",
        "- a good headlamp\n- merino socks\n- a trail guide for your region",
    ),
]
STREAMED = (
    "Streaming replies arrive word by word, the way you already know from other chat apps, "
    "and the database session is released between every poll while the bot keeps writing."
)

STOPPED = (
    "A reply that goes the wrong way can be stopped at once with the Stop button or the "
    "Escape key; it keeps what was written so far and can be regenerated."
)


def seed(database_uri: str) -> int:
    """The user and a few finished conversations; returns the id of the one to show."""
    app = create_app(
        {
            "SQLALCHEMY_DATABASE_URI": database_uri,
            "SECRET_KEY": secrets.token_hex(32),
            "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000",
        }
    )
    # The sidebar's date groups: the first conversations today, the others days and weeks ago.
    ages = [timedelta(0), timedelta(days=1), timedelta(days=4), timedelta(days=12), timedelta(days=50)]
    with unit_of_work(app) as session:
        user = auth.create_user(USERNAME, PASSWORD)
        shown = None
        now = datetime.now(UTC)
        for (title, question, answer), age in reversed(list(zip(HISTORY, ages, strict=True))):
            conversation = chat.create_conversation(user.id, title)
            _message, reply = chat.post_message(conversation, question)
            if answer is MARKDOWN_REPLY:
                # Regenerated once: the ‹ 2/2 › switcher shows under the reply.
                chat.finish_reply(reply.id, reply.attempt, FIRST_VERSION)
                reply = chat.restart_reply(conversation, session.get(Message, reply.id))
            chat.finish_reply(reply.id, reply.attempt, answer)
            session.execute(
                sa.update(Conversation).where(Conversation.id == conversation.id).values(updated_at=now - age)
            )
            shown = conversation.id
        # As the runner records it on each reply it claims (finish_reply alone leaves none).
        session.execute(sa.update(Message).where(Message.role == "assistant").values(model="echo"))
        streaming = chat.create_conversation(user.id, "How do replies stream?")
        _message, reply = chat.post_message(streaming, "Tell me about streaming.")
        chat.finish_reply(reply.id, reply.attempt, "Ask me anything and watch the reply arrive.")
    with app.app_context():
        db.engine.dispose()
    return shown


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/screens.sqlite"
        migrate(uri)
        lisbon = seed(uri)
        with (
            GunicornServer(uri, workers=1, threads=8, config={"BOT_ECHO_DELAY": 8}) as server,
            sync_playwright() as playwright,
        ):
            browser = launch(playwright)
            try:
                shoot(browser, server.url, lisbon)
            finally:
                browser.close()
    print(f"screenshots written to {OUT}/")


def log_in(page, url: str) -> None:
    page.goto(url + "/login")
    page.get_by_label("Username").fill(USERNAME)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(url + "/")


def shoot(browser, url: str, lisbon: int) -> None:
    light = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    page = light.new_page()
    page.goto(url + "/login")
    page.screenshot(path=OUT / "login.png")
    log_in(page, url)
    page.screenshot(path=OUT / "home.png")
    page.goto(f"{url}/c/{lisbon}")
    # The code block, the math and the reply's buttons (copy, regenerate, ‹ 2/2 ›, its model).
    page.locator("li.message.assistant .code-block").last.scroll_into_view_if_needed()
    page.screenshot(path=OUT / "reply.png")
    # A new chat: nothing is stored until its first message; the model and a system prompt.
    page.get_by_role("link", name="New chat").first.click()
    page.get_by_text("System prompt (optional)").click()
    page.get_by_label("System prompt").fill("Answer in short sentences.")
    page.screenshot(path=OUT / "new-chat.png")

    # Mid-stream: the newest conversation, a new message, caught while the reply is written.
    page.get_by_role("link", name="How do replies stream?").click()
    page.get_by_label("Message", exact=True).fill(STREAMED)
    page.get_by_label("Message", exact=True).press("Enter")
    reply = page.locator("li.message.assistant").last
    expect(reply.locator(".thinking")).to_be_visible()
    expect(reply).to_have_attribute("data-status", "streaming", timeout=15_000)
    page.wait_for_function(
        "() => document.querySelector('li.message.assistant:last-child .text').textContent.length > 60"
    )
    page.screenshot(path=OUT / "streaming.png")
    expect(reply).to_have_attribute("data-status", "complete", timeout=30_000)

    # Stopped part-way (the Send button is Stop while a reply is written): the text so far stays.
    page.get_by_label("Message", exact=True).fill(STOPPED)
    page.get_by_label("Message", exact=True).press("Enter")
    reply = page.locator("li.message.assistant").last
    page.wait_for_function(
        "() => document.querySelector('li.message.assistant:last-child .text').textContent.length > 40"
    )
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(reply).to_have_attribute("data-status", "stopped", timeout=15_000)
    page.mouse.move(0, 0)  # no hover colour on Send
    page.screenshot(path=OUT / "stop.png")
    light.close()

    dark = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="dark")
    page = dark.new_page()
    log_in(page, url)
    page.goto(f"{url}/c/{lisbon}")
    page.screenshot(path=OUT / "dark.png")
    dark.close()

    phone = browser.new_context(
        viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    page = phone.new_page()
    log_in(page, url)
    page.screenshot(path=OUT / "phone-list.png")
    page.goto(f"{url}/c/{lisbon}")
    page.screenshot(path=OUT / "phone-chat.png")
    phone.close()

    phone_dark = browser.new_context(
        viewport={"width": 375, "height": 740},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        color_scheme="dark",
    )
    page = phone_dark.new_page()
    log_in(page, url)
    page.goto(f"{url}/c/{lisbon}")
    page.locator("li.message.assistant .code-block").last.scroll_into_view_if_needed()
    page.screenshot(path=OUT / "phone-dark.png")
    phone_dark.close()


if __name__ == "__main__":
    main()
