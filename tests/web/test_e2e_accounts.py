"""Accounts end to end in Chromium against gunicorn: a page whose login ended says so, and
changing the password logs the other browser out."""

from __future__ import annotations

import re

import pytest

from chatapp.auth import services as auth_services
from chatapp.db import unit_of_work
from tests.support.servers import GunicornServer
from tests.web import test_e2e as e2e

pytestmark = pytest.mark.e2e

# The same Chromium and seeding app as the other end-to-end tests.
browser = e2e.browser
seeder = e2e.seeder


def problems_but(problems: list[str], status: int) -> list[str]:
    # Chromium logs every 4xx answer as a console error; a test provokes these on purpose.
    return [p for p in problems if f"status of {status}" not in p]


# Page logic only: one database is enough.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_sending_after_the_login_ended_elsewhere_says_log_in_again(browser, database_uri, seeder, tmp_path):
    from playwright.sync_api import expect

    with GunicornServer(database_uri, workers=1, threads=8, log_dir=tmp_path) as server:
        with unit_of_work(seeder):
            auth_services.create_user(e2e.USERNAME, e2e.PASSWORD)
        chatting = browser.new_context(viewport={"width": 1280, "height": 800})
        chatting.set_default_timeout(e2e.TIMEOUT_MS)
        page = chatting.new_page()
        problems = e2e.watch_for_problems(page)
        e2e.log_in(page, server.url)
        conversation_id = e2e.open_new_conversation(page, seeder, server.url)

        # A second browser of the same user logs out everywhere; this page does not know yet.
        other = browser.new_context()
        other.set_default_timeout(e2e.TIMEOUT_MS)
        settings = other.new_page()
        e2e.log_in(settings, server.url)
        settings.goto(server.url + "/settings")
        settings.get_by_role("button", name="Log out everywhere").click()
        other.close()

        e2e.send(page, "hello?")
        error = page.locator("#composer-error")
        expect(error).to_have_text("Your session has ended — log in again")
        expect(error).not_to_contain_text("Bearer")
        link = error.get_by_role("link", name="log in again")
        expect(link).to_have_attribute("href", f"/login?next=%2Fc%2F{conversation_id}")
        assert page.locator("li.message").count() == 0  # nothing was sent

        # The link logs in and comes back to the chat.
        link.click()
        page.get_by_label("Username").fill(e2e.USERNAME)
        page.get_by_label("Password").fill(e2e.PASSWORD)
        page.get_by_role("button", name="Log in").click()
        expect(page).to_have_url(f"{server.url}/c/{conversation_id}")
        assert problems_but(problems, 401) == []
        chatting.close()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_change_password_in_a_real_browser(browser, database_uri, seeder, tmp_path):
    from playwright.sync_api import expect

    with GunicornServer(database_uri, workers=1, threads=8, log_dir=tmp_path) as server:
        with unit_of_work(seeder):
            auth_services.create_user(e2e.USERNAME, e2e.PASSWORD)
        this = browser.new_context()
        this.set_default_timeout(e2e.TIMEOUT_MS)
        other = browser.new_context()
        other.set_default_timeout(e2e.TIMEOUT_MS)
        page, elsewhere = this.new_page(), other.new_page()
        problems = e2e.watch_for_problems(page)
        e2e.log_in(page, server.url)
        e2e.log_in(elsewhere, server.url)

        page.goto(server.url + "/settings")
        page.get_by_label("Current password").fill("not my password")
        page.get_by_label("New password", exact=True).fill("battery staple")
        page.get_by_label("Repeat new password").fill("battery staple")
        page.get_by_role("button", name="Change password").click()
        expect(page.get_by_text("Wrong password: your password was not changed.")).to_be_visible()

        page.get_by_label("Current password").fill(e2e.PASSWORD)
        page.get_by_label("New password", exact=True).fill("battery staple")
        page.get_by_label("Repeat new password").fill("battery staple")
        page.get_by_role("button", name="Change password").click()
        expect(page.get_by_text("Your password is changed; 1 other browser was logged out.")).to_be_visible()
        # This browser stays logged in; the other one is sent to the login page.
        page.goto(server.url + "/settings")
        expect(page).to_have_url(server.url + "/settings")
        elsewhere.goto(server.url + "/settings")
        expect(elsewhere).to_have_url(re.compile(r"/login\?next="))
        assert problems_but(problems, 403) == []  # the wrong password's page
        this.close()
        other.close()
