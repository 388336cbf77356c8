"""The chat page's furniture: the action row under messages, the sidebar's date groups and
entry menus, the sidebar page kept, the way back to the newest messages, the composer's limit."""

import html as htmllib
import re
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa

from chatapp.chat.models import Conversation, Message, Status
from chatapp.db import unit_of_work
from chatapp.web.pages import date_group
from tests.helpers import wait_for_background_work
from tests.web.conftest import count, seed_reply


@pytest.fixture
def alice(web):
    web.register("alice")
    return web


def set_updated_at(app, conversation_id: int, moment: datetime) -> None:
    with unit_of_work(app) as session:
        session.execute(sa.update(Conversation).where(Conversation.id == conversation_id).values(updated_at=moment))


def group_labels(html: str) -> list[str]:
    return re.findall(r'<h3 class="group-label">([^<]*)</h3>', html)


def sidebar_links(html: str) -> dict[str, str]:
    """Title -> href of each sidebar entry."""
    found = re.findall(r'class="conversation-link" href="([^"]+)"\s*(?:aria-current="page")?>([^<]*)</a>', html)
    return {title: htmllib.unescape(href) for href, title in found}


# --- the action row under each message ------------------------------------------------------------


def test_every_message_has_a_copy_button_and_the_latest_reply_a_regenerate_button(client, app, alice):
    conversation_id, first_reply = seed_reply(app, "alice", "one", "**bold** <b>x</b>")
    client.post(f"/c/{conversation_id}/messages", data={"content": "two"})
    wait_for_background_work(app)
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    rows = re.findall(r'<div class="message-actions">(.*?)</div>\s*</li>', html, re.S)
    # Four messages, plus the script's two blank ones, each with its row and one Copy.
    assert len(rows) == 6
    assert all(row.count('aria-label="Copy" title="Copy"') == 1 for row in rows)
    assert html.count('aria-label="Regenerate" title="Regenerate"') == 1
    latest = f'action="/c/{conversation_id}/messages/{first_reply + 2}/regenerate"'
    assert latest in rows[3] and 'class="regenerate-form"' not in rows[1]
    # Copy takes a rendered reply's text as written (escaped here, so markup stays text).
    assert 'data-raw="**bold** &lt;b&gt;x&lt;/b&gt;"' in rows[1]
    assert "<svg" in rows[0] and 'aria-hidden="true"' in rows[0]


def test_the_regenerate_icon_still_posts_without_javascript(client, app, alice):
    conversation_id, reply_id = seed_reply(app, "alice", "again", "first answer")
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    form = re.search(r'<form method="post" class="regenerate-form"\s+action="([^"]+)">(.*?)</form>', html, re.S)
    assert form and 'type="submit"' in form.group(2) and 'name="csrf_token"' in form.group(2)
    response = client.post(form.group(1))
    assert response.status_code == 302
    wait_for_background_work(app)
    with unit_of_work(app, write=False) as session:
        reply = session.get(Message, reply_id)
        # A new version beside the first reply, which stays as it was.
        versions = session.scalars(sa.select(Message).where(Message.parent_id == reply.parent_id).order_by(Message.id))
        assert [(m.id == reply_id, m.status, m.content) for m in versions] == [
            (True, Status.COMPLETE, "first answer"),
            (False, Status.COMPLETE, "again"),
        ]


def test_a_failed_reply_says_regenerate_in_words(client, app, alice):
    conversation_id, _reply_id = seed_reply(app, "alice", "try me", "half", error="the model server is down")
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert re.search(
        r'<button type="submit" class="button primary small"><svg[^>]*>.*?</svg> Regenerate</button>', html, re.S
    )


# --- the sidebar -------------------------------------------------------------------------------------


def test_sidebar_groups_by_date_in_utc_without_a_script(client, app, alice):
    now = datetime.now(UTC)
    ages = {"now": 0, "yesterday": 1, "days ago": 5, "weeks ago": 20, "long ago": 400}
    for title, days in ages.items():
        conversation_id, _ = seed_reply(app, "alice", "q", "a", title=title)
        set_updated_at(app, conversation_id, now - timedelta(days=days))
    html = client.get("/").get_data(as_text=True)
    long_ago = (now - timedelta(days=400)).date()
    assert group_labels(html) == [
        "Today",
        "Yesterday",
        "Previous 7 days",
        "Previous 30 days",
        long_ago.strftime("%B %Y"),
    ]
    # Each entry carries its time with its offset, for the page script to regroup by local dates.
    stamps = re.findall(r'data-updated="([^"]+)"', html)
    assert len(stamps) == 5 and all(datetime.fromisoformat(stamp).utcoffset() == timedelta(0) for stamp in stamps)


@pytest.mark.parametrize(
    ("day", "label"),
    [
        (date(2026, 3, 10), "Today"),
        (date(2026, 3, 11), "Today"),  # a clock ahead of the server's: still today
        (date(2026, 3, 9), "Yesterday"),
        (date(2026, 3, 8), "Previous 7 days"),
        (date(2026, 3, 3), "Previous 7 days"),
        (date(2026, 3, 2), "Previous 30 days"),
        (date(2026, 2, 8), "Previous 30 days"),
        (date(2026, 2, 7), "February"),
        (date(2025, 12, 31), "December 2025"),
    ],
)
def test_date_group_boundaries(day, label):
    assert date_group(day, date(2026, 3, 10)) == label


def test_opening_a_chat_from_sidebar_page_two_keeps_page_two(client, app, alice):
    app.config["WEB_CONVERSATIONS_PER_PAGE"] = 2
    ids = {title: seed_reply(app, "alice", "hi", "hello", title=title)[0] for title in ["first", "second", "third"]}
    html = client.get("/").get_data(as_text=True)
    assert sidebar_links(html)["third"] == f"/c/{ids['third']}"  # the first page needs no cursor
    older = htmllib.unescape(re.search(r'href="(/\?older=[^"]+)">Older</a>', html).group(1))
    cursor = older.split("older=", 1)[1]
    page_two = client.get(older).get_data(as_text=True)
    link = sidebar_links(page_two)["first"]
    assert link == f"/c/{ids['first']}?older={cursor}"
    opened = client.get(link).get_data(as_text=True)
    assert list(sidebar_links(opened)) == ["first"]  # still page 2, with the chat open
    assert 'aria-current="page">first</a>' in opened
    # Renaming and sending from there come back to page 2 as well.
    rename = re.search(r'action="([^"]+/rename[^"]*)"', opened).group(1)
    response = client.post(htmllib.unescape(rename), data={"title": "renamed"})
    assert response.headers["Location"] == link
    send = re.search(r'action="([^"]+/messages\?[^"]*)"', opened).group(1)
    response = client.post(htmllib.unescape(send), data={"content": "more"})
    assert response.headers["Location"] == link
    wait_for_background_work(app)


def test_every_page_with_a_sidebar_shows_the_page_of_it_asked_for(client, app, alice):
    """One helper reads the sidebar of every signed-in page: each takes ``?older=`` alike."""
    app.config["WEB_CONVERSATIONS_PER_PAGE"] = 2
    first, reply = seed_reply(app, "alice", "hi", "hello", title="first")
    for title in ["second", "third"]:
        seed_reply(app, "alice", "hi", "hello", title=title)
    older = re.search(r'href="(/\?older=[^"]+)">Older</a>', client.get("/").get_data(as_text=True)).group(1)
    query = htmllib.unescape(older).split("?", 1)[1]
    pages = ["/", "/chat/new", "/settings", "/settings/delete-account", f"/c/{first}", f"/c/{first}/delete"]
    pages.append(f"/c/{first}/messages/{reply - 1}/edit")  # the user's message, before its reply
    for path in pages:
        html = client.get(f"{path}?{query}").get_data(as_text=True)
        assert list(sidebar_links(html)) == ["first"], path
        assert list(sidebar_links(client.get(path).get_data(as_text=True))) == ["third", "second"], path


def test_each_sidebar_entry_has_a_menu_with_rename_and_delete(client, app, alice):
    conversation_id, _ = seed_reply(app, "alice", "q", "a", title="Trip <plans>")
    html = client.get("/").get_data(as_text=True)
    assert 'aria-label="Options for Trip &lt;plans&gt;"' in html
    rename = f'href="/c/{conversation_id}?rename=1"'
    delete = f'href="/c/{conversation_id}/delete" data-delete>'
    assert rename in html and delete in html
    # Rename opens the conversation with its rename pop-over open (no script needed)...
    page = client.get(f"/c/{conversation_id}?rename=1").get_data(as_text=True)
    assert '<details class="menu rename" open>' in page
    assert '<details class="menu rename">' in client.get(f"/c/{conversation_id}").get_data(as_text=True)
    # ...and Delete goes to the page that asks first (the script asks in a dialog instead).
    assert "Delete “Trip &lt;plans&gt;”?" in client.get(f"/c/{conversation_id}/delete").get_data(as_text=True)
    assert count(app, Conversation) == 1


def test_the_username_has_room_and_its_full_name_in_a_title(client, web):
    web.register("a_rather_long_user_name_of_forty_chars_x")
    html = client.get("/").get_data(as_text=True)
    assert 'class="whoami" title="a_rather_long_user_name_of_forty_chars_x"' in html
    # Settings and Log out are icons with names, not words taking the name's room.
    assert 'aria-label="Settings" title="Settings"' in html and 'aria-label="Log out" title="Log out"' in html


# --- the history and the composer ------------------------------------------------------------------------


def test_an_earlier_page_links_back_to_the_newest_messages(client, app, alice):
    app.config["WEB_MESSAGES_PER_PAGE"] = 2
    conversation_id, _ = seed_reply(app, "alice", "q1", "a1")
    client.post(f"/c/{conversation_id}/messages", data={"content": "q2"})
    wait_for_background_work(app)
    newest = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert "Back to newest messages" not in newest
    earlier = htmllib.unescape(re.search(r'href="([^"]+before=\d+[^"]*)">Show earlier messages</a>', newest).group(1))
    page = client.get(earlier).get_data(as_text=True)
    assert re.findall(r'<div class="text plain">(q\d)</div>', page) == ["q1"]
    back = re.search(r'<a class="button small" href="([^"]+)">.*?Back to newest messages</a>', page, re.S)
    assert back and back.group(1) == f"/c/{conversation_id}"


@pytest.mark.parametrize("extra_config", [{"MESSAGE_MAX_LENGTH": 50}], indirect=True)
def test_the_composer_knows_the_limit_and_the_server_never_cuts_a_long_message(client, app, alice):
    conversation_id = alice.new_conversation()
    html = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    box = re.search(r'<textarea[^>]*name="content"[^>]*>', html).group(0)
    assert 'data-max-length="50"' in box
    assert "maxlength" not in box  # the browser would cut pasted text silently
    assert 'id="composer-counter"' in html
    too_long = "x" * 51
    response = client.post(f"/c/{conversation_id}/messages", data={"content": too_long})
    assert response.status_code == 422
    body = response.get_data(as_text=True)
    assert "Content must be 1-50 characters." in body
    assert re.search(rf">\s*{too_long}</textarea>", body)  # kept whole, to shorten by hand
    assert count(app, Message) == 0
