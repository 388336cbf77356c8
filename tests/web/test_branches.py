"""Branches in the browser without JavaScript: Edit (a form page), the ‹ 2/3 › switcher, regenerate."""

import re

import pytest

from chatapp.chat.models import Message
from tests.helpers import wait_for_background_work
from tests.web.conftest import count, seed_reply


@pytest.fixture
def alice(web):
    web.register("alice")
    return web


def texts(html: str) -> list[str]:
    return [
        re.sub(r"<[^>]+>", "", text).strip()
        for text in re.findall(r'<div class="text (?:plain|markdown)">(.*?)</div>', html.split("<template")[0], re.S)
    ]


def test_edit_makes_a_new_branch_and_the_switcher_goes_back(client, app, alice):
    conversation_id, reply_id = seed_reply(app, "alice", "first question", "first answer")
    message_id = reply_id - 1
    page = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    edit_url = f"/c/{conversation_id}/messages/{message_id}/edit"
    assert f'href="{edit_url}"' in page and 'class="versions"' not in page.split("<template")[0]

    form = client.get(edit_url)
    assert form.status_code == 200 and "first question</textarea>" in form.get_data(as_text=True)
    response = client.post(edit_url, data={"content": "second question"})
    assert response.status_code == 302 and response.headers["Location"] == f"/c/{conversation_id}"
    wait_for_background_work(app)
    page = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert texts(page) == ["second question", "second question"]  # the echo bot's answer
    assert '<span class="version-position">2/2</span>' in page
    assert f'name="message_id"\n                value="{message_id}"' in page

    switched = client.post(f"/c/{conversation_id}/branch", data={"message_id": message_id})
    assert switched.status_code == 302
    assert switched.headers["Location"] == f"/c/{conversation_id}#message-{message_id}"
    page = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert texts(page) == ["first question", "first answer"]
    assert '<span class="version-position">1/2</span>' in page


def test_regenerate_shows_versions_of_the_reply(client, app, alice):
    conversation_id, reply_id = seed_reply(app, "alice", "hello", "one answer")
    assert client.post(f"/c/{conversation_id}/messages/{reply_id}/regenerate").status_code == 302
    wait_for_background_work(app)
    page = client.get(f"/c/{conversation_id}").get_data(as_text=True)
    assert texts(page) == ["hello", "hello"]
    assert '<span class="version-position">2/2</span>' in page
    # The fragment the page swaps in when a reply ends has the switcher too.
    fragment = client.get(f"/c/{conversation_id}/messages/{reply_id + 1}").get_data(as_text=True)
    assert '<span class="version-position">2/2</span>' in fragment


def test_bad_edits_and_switches_show_a_message_and_write_nothing(client, app, alice, web):
    conversation_id, reply_id = seed_reply(app, "alice", "mine", "answer")
    message_id = reply_id - 1
    edit_url = f"/c/{conversation_id}/messages/{message_id}/edit"
    before = count(app, Message)
    blank = client.post(edit_url, data={"content": "   "})
    assert blank.status_code == 422 and 'class="error-text"' in blank.get_data(as_text=True)
    assert client.get(f"/c/{conversation_id}/messages/{reply_id}/edit").status_code == 404  # the bot's
    assert client.post(f"/c/{conversation_id}/messages/{reply_id}/edit", data={"content": "x"}).status_code == 404
    assert client.post(f"/c/{conversation_id}/messages/999999/edit", data={"content": "x"}).status_code == 404
    assert client.post(f"/c/{conversation_id}/branch", data={"message_id": "x"}).status_code == 422
    assert client.post(f"/c/{conversation_id}/branch", data={"message_id": "999999"}).status_code == 404
    assert count(app, Message) == before

    web.logout()
    web.register("mallory")
    assert client.get(edit_url).status_code == 404
    assert client.post(edit_url, data={"content": "x"}).status_code == 404
    assert client.post(f"/c/{conversation_id}/branch", data={"message_id": message_id}).status_code == 404
    assert count(app, Message) == before


@pytest.mark.parametrize("extra_config", [{"WEB_MESSAGES_PER_PAGE": 3}], indirect=True)
def test_the_page_and_its_earlier_messages_follow_the_current_branch(client, app, alice):
    conversation_id, reply_id = seed_reply(app, "alice", "q0", "a0")
    for n in range(1, 4):
        client.post(f"/c/{conversation_id}/messages", data={"content": f"q{n}"})
        wait_for_background_work(app)
    # Edit q2: the current branch is q0 a0 q1 q1 q2' q2' (the echo bot answers with the question).
    q2 = reply_id + 3  # q0 a0 q1 a1 q2: ids in the order written
    assert client.post(f"/c/{conversation_id}/messages/{q2}/edit", data={"content": "q2 again"}).status_code == 302
    wait_for_background_work(app)
    seen, url = [], f"/c/{conversation_id}"
    while url:
        page = client.get(url).get_data(as_text=True)
        seen = texts(page) + seen
        earlier = re.search(r'<p class="earlier">\s*<a href="([^"]+)"', page)
        url = earlier.group(1).replace("&amp;", "&") if earlier else None
    assert seen == ["q0", "a0", "q1", "q1", "q2 again", "q2 again"]
