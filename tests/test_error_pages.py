"""Error pages never become a bare 500, even when rendering them needs the database."""

import sqlalchemy as sa

from chatapp.extensions import login_manager


def test_logged_in_page_during_a_database_outage_is_a_503_page(client, app, monkeypatch):
    client.post("/register", data={"username": "alice", "password": "correct horse", "confirm": "correct horse"})
    assert client.get("/").status_code == 200

    def database_down(user_id):
        raise sa.exc.OperationalError("SELECT users", {}, Exception("connection refused"))

    # Loading the logged-in user fails, and so would rendering error.html with Flask-Login's
    # current_user: the error page must still answer with the outage's status.
    monkeypatch.setattr(login_manager, "_user_callback", database_down)
    response = client.get("/")
    assert response.status_code == 503
    assert response.mimetype == "text/html"
    assert "database is unavailable" in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)
