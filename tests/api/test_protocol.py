"""Transport-level rules: body size, content type, malformed JSON, unknown routes, the OpenAPI document."""

import pytest
import sqlalchemy as sa

from chatapp.auth.models import User
from chatapp.db import unit_of_work
from tests.api.test_accounts import assert_error


def users(app) -> int:
    with unit_of_work(app, write=False) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(User))


def test_body_over_1_mb_is_413(client, app):
    body = '{"username": "alice", "password": "' + "x" * (1024 * 1024) + '"}'
    response = client.post("/api/v1/users", data=body, content_type="application/json")
    assert_error(response, 413, "payload_too_large")
    assert users(app) == 0


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_non_json_content_type_is_415(client, app, content_type):
    response = client.post("/api/v1/users", data="username=alice&password=12345678", content_type=content_type)
    assert_error(response, 415, "unsupported_media_type")
    assert users(app) == 0


@pytest.mark.parametrize("body", ["{", "[1, 2", "nul", "\xff"])
def test_malformed_json_is_400(client, app, body):
    response = client.post("/api/v1/users", data=body, content_type="application/json")
    assert_error(response, 400)
    assert users(app) == 0


@pytest.mark.parametrize("body", ["[]", "123", '"text"', "null"])
def test_json_that_is_not_an_object_is_rejected(client, app, body):
    response = client.post("/api/v1/users", data=body, content_type="application/json")
    assert response.status_code in (400, 422)
    assert_error(response, response.status_code)
    assert users(app) == 0


@pytest.mark.parametrize("path", ["/api/", "/api/v1/nope", "/api/v2/conversations", "/api/v1/conversations/abc"])
def test_unknown_api_routes_are_json_404(client, path):
    assert_error(client.get(path), 404, "not_found")


def test_wrong_method_is_json_405(client):
    assert_error(client.put("/api/v1/conversations"), 405)


def test_openapi_document_lists_every_route(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    expected = {
        "/api/v1/users": {"post"},
        "/api/v1/tokens": {"post"},
        "/api/v1/tokens/current": {"delete"},
        "/api/v1/conversations": {"get", "post"},
        "/api/v1/conversations/{conversation_id}": {"get", "patch", "delete"},
        "/api/v1/conversations/{conversation_id}/messages": {"get", "post"},
        "/api/v1/conversations/{conversation_id}/messages/{reply_id}/regenerate": {"post"},
        "/api/v1/conversations/{conversation_id}/messages/{reply_id}/stream": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(spec["paths"][path]), path
    # Generated from the validating schemas: the content rule is in the document.
    message_in = spec["components"]["schemas"]["MessageIn"]["properties"]["content"]
    assert message_in["maxLength"] == 32000 and message_in["minLength"] == 1
    error = spec["components"]["schemas"]["ErrorOut"]
    assert "error" in error["properties"]


def test_healthz_and_readyz(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ok"}


def test_readyz_is_503_when_the_database_is_unreachable():
    from chatapp import create_app
    from tests.support.servers import free_port

    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
            "REPLY_SWEEP_INTERVAL": 0,
        }
    )
    response = app.test_client().get("/readyz")
    assert_error(response, 503, "database_unavailable")
