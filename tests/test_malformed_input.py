"""Malformed requests get a 4xx in the app's error shape, store nothing and log no error.

Every route is found from ``app.url_map`` (an API operation reads a JSON body when the OpenAPI
document gives it one), so a new route is covered without touching this file. Each class of
malformed input is tried by hand first, then Hypothesis generates more: JSON bodies whose
shape is wrong or whose text cannot be stored, bytes that are not UTF-8, form bodies, query
strings and headers.

    CHATAPP_FUZZ_EXAMPLES=500 python -m pytest tests/test_malformed_input.py
"""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from chatapp.db import Base, unit_of_work
from chatapp.inputs import MAX_JSON_DEPTH, InvalidJSON, decode_json
from chatapp.web.forms import Form
from tests.helpers import start_conversation
from tests.test_security import PASSWORD, Owner, fill, log_in, openapi_path

EXAMPLES = int(os.environ.get("CHATAPP_FUZZ_EXAMPLES", "25"))
ARGUMENT = re.compile(r"<(?:(?P<converter>\w+):)?(?P<name>\w+)>")
REFUSED = (400, 422)


def fuzz_settings(examples: int = EXAMPLES):
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


# --- what every answer must be -------------------------------------------------------------------


def row_counts(app) -> dict[str, int]:
    with unit_of_work(app, write=False) as session:
        return {
            table.name: session.scalar(sa.select(sa.func.count()).select_from(table))
            for table in Base.metadata.sorted_tables
        }


def assert_api_refusal(response, what) -> None:
    assert response.status_code in REFUSED, (what, response.status_code, response.get_data(as_text=True)[:300])
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, (what, body)
    assert body["error"]["code"] in ("bad_request", "invalid") and body["error"]["message"], (what, body)


def assert_no_server_error(response, what, *, api: bool) -> None:
    assert response.status_code < 500, (what, response.status_code, response.get_data(as_text=True)[:300])
    if response.status_code >= 400:
        if api:
            assert set(response.get_json()) == {"error"}, (what, response.get_data(as_text=True)[:300])
        else:
            assert response.mimetype == "text/html", (what, response.mimetype)


def assert_no_errors_logged(caplog) -> None:
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, [record.getMessage() for record in errors]


# --- the routes ----------------------------------------------------------------------------------


def routes(app, prefix_api: bool):
    """(rule, method) for every route of the API, or of everything else, from the URL map."""
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.rule.startswith("/api/") != prefix_api:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule, method


def body_operations(app, client) -> list[tuple[str, str, dict]]:
    """(rule, method, request schema) of every API operation that reads a JSON body."""
    spec = client.get("/api/v1/openapi.json").get_json()
    found = []
    for rule, method in routes(app, prefix_api=True):
        if rule.endpoint.startswith("api-docs."):
            continue  # the document itself
        operation = spec["paths"].get(openapi_path(rule.rule), {}).get(method.lower())
        assert operation is not None, f"{method} {rule.rule} is not in the OpenAPI document"
        content = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if content is not None:
            schema = content["schema"]
            if "$ref" in schema:
                schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
            found.append((rule.rule, method, schema))
    assert len(found) >= 5, found
    return found


@pytest.fixture
def owner(app, client):
    return Owner(app, client, "malformed")


# --- the decoder on its own --------------------------------------------------------------------


NOT_READABLE = {
    "a lone high surrogate": b'{"title": "\\ud800"}',
    "a lone low surrogate": b'{"title": "x\\udfffy"}',
    "a reversed pair": b'{"title": "\\udc00\\ud800"}',
    "a surrogate in a key": b'{"\\ud800": "x"}',
    "a surrogate in an array": b'{"title": ["ok", "\\ud800"]}',
    "a surrogate at the top": b'"\\udbff"',
    "a surrogate encoded as UTF-8 bytes": b'{"title": "\xed\xa0\x80"}',
    "bytes that are not UTF-8": b'{"title": "caf\xe9"}',
    "UTF-16": '{"title": "x"}'.encode("utf-16"),
    "a byte order mark": b'\xef\xbb\xbf{"title": "x"}',
    "NaN": b'{"title": NaN}',
    "Infinity": b'{"title": Infinity}',
    "-Infinity": b'{"title": -Infinity}',
    "a number of 5000 digits": b'{"title": 1' + b"0" * 5000 + b"}",
    "arrays nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "objects nested 100000 deep": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    f"arrays nested {MAX_JSON_DEPTH + 1} deep": b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
    "a duplicate key": b'{"title": "a", "title": "b"}',
    "not JSON": b"{title: 'x'}",
    "truncated": b'{"title": "x"',
    "only spaces": b"   ",
    "two documents": b'{"title": "a"} {"title": "b"}',
}


@pytest.mark.parametrize("body", NOT_READABLE.values(), ids=NOT_READABLE.keys())
def test_the_decoder_refuses_what_cannot_be_read(body):
    with pytest.raises(InvalidJSON):
        decode_json(body)


@pytest.mark.parametrize(
    "text, value",
    [
        ('{"title": "\\ud83d\\ude00 \\u00e9 \\uffff \\u0000"}', {"title": "\U0001f600 é \uffff \x00"}),
        ("[[[[1]]]]", [[[[1]]]]),
        ('{"a": 1.5e300, "b": -0, "c": null, "d": true}', {"a": 1.5e300, "b": 0, "c": None, "d": True}),
        ('"x"', "x"),
        ('{"title": "caf\u00e9"}', {"title": "café"}),
    ],
)
def test_the_decoder_reads_json_as_json(text, value):
    """Pairs, non-characters and NUL are text (NUL is refused per field, by the schemas)."""
    assert decode_json(text.encode()) == value == json.loads(text)


def test_the_decoder_finds_a_surrogate_anywhere_and_names_where():
    with pytest.raises(InvalidJSON, match=r"at 'content'"):
        decode_json(b'{"content": "ok \\ud800"}')
    with pytest.raises(InvalidJSON, match=r"'a'\.b\[1\]"):
        decode_json(b'{"a": {"b": ["ok", "\\udc00"]}}')


# --- the API: every operation that reads a body --------------------------------------------------


WRONG_SHAPES = {
    "a list": b"[]",
    "a list of an object": b'[{"title": "x", "content": "x"}]',
    "a string": b'"x"',
    "a number": b"1",
    "null": b"null",
    "true": b"true",
}


def field_values(schema: dict) -> dict:
    """A value for each of the schema's fields, to put a wrong value next to right ones."""
    return {name: "correct horse" for name in schema.get("properties", {})}


def malformed_bodies(schema: dict) -> dict[str, bytes]:
    """Every class of unreadable or misshapen body, aimed at this operation's own fields."""
    bodies = dict(NOT_READABLE)
    bodies.update(WRONG_SHAPES)
    for field, spec in schema.get("properties", {}).items():
        base = field_values(schema)
        for label, value in [
            ("an object", {"a": "b"}),
            ("a list", ["x"]),
            ("a number", 12),
            ("a huge number", 10**300),
            ("a float", 1.5),
            ("null", None),
            ("true", True),
        ]:
            if spec.get("type") == "boolean" and isinstance(value, bool):
                continue  # a flag's right value, not a malformed one
            if label == "a number" and spec.get("type") == "integer":
                continue  # a well-formed value of an integer field (an id), not a malformed one
            bodies[f"{field} as {label}"] = json.dumps({**base, field: value}).encode()
        for label, text in [
            ("a lone surrogate", "\\ud800"),
            ("a low surrogate", "ab\\udc00"),
            ("a NUL", "\\u0000"),
            ("NaN", None),
        ]:
            raw = json.dumps(base)
            replacement = "NaN" if text is None else f'"correct horse{text}"'
            bodies[f"{field} with {label}"] = raw.replace(
                f'"{field}": "correct horse"', f'"{field}": {replacement}'
            ).encode()
    return bodies


def test_every_malformed_body_to_every_api_operation_is_refused(app, client, owner, caplog):
    caplog.set_level(logging.WARNING)
    operations = body_operations(app, client)
    tried = 0
    for rule, method, schema in operations:
        url = fill(rule, owner.ids)
        for name, body in malformed_bodies(schema).items():
            before = row_counts(app)
            response = client.open(
                url, method=method, data=body, content_type="application/json", headers=owner.headers
            )
            if rule == "/api/v1/tokens" and response.status_code == 401 and "password" in name:
                continue  # a password that can be read but is wrong (NUL is text, never stored)
            assert_api_refusal(response, f"{method} {rule}: {name}")
            assert row_counts(app) == before, f"{method} {rule}: {name} stored something"
            tried += 1
    assert tried > 100
    assert_no_errors_logged(caplog)


def test_a_body_without_required_fields_and_an_empty_body(app, client, owner, caplog):
    """No body at all reads as no fields: an operation without required fields still works."""
    url = f"/api/v1/conversations/{owner.ids['conversation_id']}"
    for method, target in [("PATCH", url), ("POST", url + "/messages"), ("POST", "/api/v1/tokens")]:
        for body in (b"", b"{}"):
            response = client.open(
                target, method=method, data=body, content_type="application/json", headers=owner.headers
            )
            assert_api_refusal(response, (target, body))
    created = client.post("/api/v1/conversations", data=b"", content_type="application/json", headers=owner.headers)
    assert created.status_code == 201 and created.get_json()["title"] == "New chat"
    assert_no_errors_logged(caplog)


# Text with every kind of character, lone surrogates and NUL included.
ANY_CHARACTER = st.one_of(
    st.characters(),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.sampled_from(["\x00", "\uffff", "\ufffe", "\U0010ffff", "\u2028", "\r", "\ufeff"]),
)
ANY_TEXT = st.text(ANY_CHARACTER, max_size=30)
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    ANY_TEXT,
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(ANY_TEXT, children, max_size=3),
    max_leaves=8,
)


def api_body(schema: dict):
    """JSON bodies near this operation's own: its fields, other keys, values of any type and
    text of any character, encoded ASCII-escaped or as raw UTF-8, sometimes corrupted."""
    fields = list(schema.get("properties", {})) or ["x"]
    value = st.one_of(
        st.dictionaries(st.sampled_from(fields) | ANY_TEXT, JSON_VALUES | ANY_TEXT, max_size=4),
        JSON_VALUES,
        st.sampled_from(["deep", "huge"]),
    )

    @st.composite
    def encoded(draw):
        data = draw(value)
        if data == "deep":
            depth = draw(st.integers(MAX_JSON_DEPTH - 2, 3000))
            return b"[" * depth + b"]" * depth
        if data == "huge":
            return b'{"%s": 1%s}' % (draw(st.sampled_from(fields)).encode(), b"0" * draw(st.integers(4000, 5000)))
        text = json.dumps(data, ensure_ascii=draw(st.booleans()))
        raw = text.encode("utf-8", "surrogatepass")
        if draw(st.integers(0, 4)) == 0 and raw:
            at = draw(st.integers(0, len(raw)))
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at:]
        return raw

    return encoded()


def test_generated_bodies_never_get_a_5xx(app, client, owner, caplog):
    caplog.set_level(logging.WARNING)
    operations = body_operations(app, client)

    for rule, method, schema in operations:
        fuzz_body(app, client, owner, caplog, fill(rule, owner.ids), method, rule, schema)


def fuzz_body(app, client, owner, caplog, url: str, method: str, rule: str, schema) -> None:
    """Bodies generated for one operation: never a 5xx; a refusal stores nothing."""

    @fuzz_settings()
    @given(body=api_body(schema))
    def check(body):
        before = row_counts(app)
        response = client.open(url, method=method, data=body, content_type="application/json", headers=owner.headers)
        what = f"{method} {rule}: {body[:200]!r}"
        assert_no_server_error(response, what, api=True)
        if response.status_code in REFUSED:
            assert_api_refusal(response, what)
            assert row_counts(app) == before, f"{what} stored something"
        assert_no_errors_logged(caplog)
        assert app.extensions["chatapp.reply_runner"].wait_idle(30)

    check()


# --- the API: query strings and headers ----------------------------------------------------------


BAD_QUERY_VALUES = [
    "",
    "0",
    "-1",
    "%FF",
    "%ED%A0%80",
    "%C0%AF",
    "%00",
    "1e9",
    "NaN",
    "9" * 5000,
    "%EF%BF%BF",
    "%F4%90%80%80",
    "a%0Ab",
    "AAAA",
    "=",
    "MTIz%3D",
    "%E2%80%AE",
]


def test_every_api_get_with_malformed_query_strings(app, client, owner, caplog):
    caplog.set_level(logging.WARNING)
    walked = 0
    for rule, method in routes(app, prefix_api=True):
        if method != "GET" or rule.rule.endswith("/stream"):
            continue
        url = fill(rule.rule, owner.ids)
        for name in ("cursor", "limit", "before", "\xff"):
            for value in BAD_QUERY_VALUES:
                response = client.get(f"{url}?{name}={value}", headers=owner.headers)
                assert_no_server_error(response, (url, name, value), api=True)
                walked += 1
    assert walked > 100
    assert_no_errors_logged(caplog)


def latin1(text: str) -> str:
    """How a WSGI server hands over a header sent as UTF-8 bytes."""
    return text.encode("utf-8").decode("latin-1")


BAD_HEADER_VALUES = [
    latin1("é"),
    latin1("\U0001f600"),
    "\x7f",
    "a" * 5000,
    "1:2:3",
    "-1:0",
    "0:" + "9" * 30,
    latin1("１:２"),
    "\x00",
    " ",
    "Bearer",
    "Bearer  ",
    "bearer x",
    "Basic Zm9vOmJhcg==",
]


def test_every_api_route_with_malformed_headers(app, client, owner, caplog):
    caplog.set_level(logging.WARNING)
    for rule, method in routes(app, prefix_api=True):
        url = fill(rule.rule, owner.ids)
        for header in ("Authorization", "Last-Event-ID", "Idempotency-Key", "X-Request-ID", "Content-Type"):
            for value in BAD_HEADER_VALUES:
                if value == "\x00":
                    continue  # no HTTP server passes it on; Werkzeug's test client refuses it
                headers = {**owner.headers, header: value}
                kwargs = {"json": {"content": "x"}} if method in ("POST", "PATCH") and header != "Content-Type" else {}
                if method == "DELETE":
                    continue  # would end the owner's token or logins; nothing is read from headers but auth
                response = client.open(url, method=method, headers=headers, **kwargs)
                assert_no_server_error(response, (method, url, header, value), api=True)
                assert app.extensions["chatapp.reply_runner"].wait_idle(30)
    assert_no_errors_logged(caplog)


# --- the browser: every form, query string and JSON sent where a form belongs ---------------------


def form_field_names() -> list[str]:
    names = set()
    for form_class in Form.__subclasses__():
        names.update(name for name, value in vars(form_class).items() if hasattr(value, "field_class"))
    assert {"username", "password", "title", "content", "name"} <= names, names
    return sorted(names)


FORM_BODIES = {
    "bytes that are not UTF-8": b"%(f)s=%%FF%%FEx",
    "raw bytes that are not UTF-8": b"%(f)s=\xff\xfe\xed\xa0\x80",
    "a surrogate encoded as UTF-8": b"%(f)s=%%ED%%A0%%80",
    "an overlong encoding": b"%(f)s=%%C0%%AF",
    "a NUL": b"%(f)s=a%%00b",
    "a NUL in a key": b"%(f)s%%00=a",
    "a non-character": b"%(f)s=%%EF%%BF%%BF",
    "beyond Unicode": b"%(f)s=%%F4%%90%%80%%80",
    "a field twice": b"%(f)s=a&%(f)s=b",
    "only spaces": b"%(f)s=%%20%%20",
    "very long": b"%(f)s=" + b"x" * 100_000,
}
JSON_FOR_FORMS = [b"[1]", b"5", b"null", b'"x"']
JSON_VALUES_FOR_FORMS = [{"a": 1}, 5, None, "a\x00", ["a", "b"]]


def form_bodies(fields: list[str]) -> list[tuple[bytes, str]]:
    """Each class of malformed form body, in every field at once; JSON where a form belongs."""
    bodies = [
        (b"&".join(template % {b"f": field.encode()} for field in fields), "application/x-www-form-urlencoded")
        for template in FORM_BODIES.values()
    ]
    bodies += [(body, "application/json") for body in JSON_FOR_FORMS]
    bodies += [
        (json.dumps(dict.fromkeys(fields, value)).encode(), "application/json") for value in JSON_VALUES_FOR_FORMS
    ]
    bodies.append((json.dumps(dict.fromkeys(fields, "x")).replace('"x"', '"\\ud800"').encode(), "application/json"))
    return bodies


def web_session(app, client, username: str):
    """A logged-in browser and ids of its own: a fresh conversation, a reply, a token, its login."""
    browser, _csrf = log_in(app, username)
    conversation_id = start_conversation(browser)
    headers = {
        "Authorization": f"Bearer {client.post('/api/v1/tokens', json={'username': username, 'password': PASSWORD}).get_json()['token']}"
    }
    posted = client.post(f"/api/v1/conversations/{conversation_id}/messages", json={"content": "hi"}, headers=headers)
    assert app.extensions["chatapp.reply_runner"].wait_idle(30)
    ids = {
        "conversation_id": conversation_id,
        "reply_id": posted.get_json()["reply"]["id"],
        "message_id": 1,
        "token_id": 1,
        "session_id": 1,
    }
    return browser, ids


def test_every_web_form_with_malformed_bodies(app, client, owner, caplog):
    caplog.set_level(logging.WARNING)
    fields = form_field_names()
    posts = [rule for rule, method in routes(app, prefix_api=False) if method == "POST"]
    assert len(posts) >= 8
    for rule in posts:
        destructive = rule.rule in ("/logout", "/settings/sessions/end-all") or rule.rule.endswith(("/delete", "/end"))
        anonymous = rule.rule in ("/login", "/register")
        browser, ids = (app.test_client(), owner.ids) if anonymous else web_session(app, client, owner.username)
        for body, content_type in form_bodies(fields):
            if anonymous:
                browser = app.test_client()  # a registration that went through would log in
            response = browser.post(fill(rule.rule, ids), data=body, content_type=content_type)
            assert_no_server_error(response, (rule.rule, body[:80]), api=False)
            assert app.extensions["chatapp.reply_runner"].wait_idle(30)
            if destructive:
                break  # it logged out or deleted: nothing more to read
    assert_no_errors_logged(caplog)


def test_generated_form_bodies_never_get_a_5xx(app, client, owner, caplog):
    caplog.set_level(logging.WARNING)
    fields = form_field_names()
    browser, ids = web_session(app, client, owner.username)
    posts = [
        rule.rule
        for rule, method in routes(app, prefix_api=False)
        if method == "POST"
        and not (
            rule.rule in ("/logout", "/settings/sessions/end-all")
            or "delete" in rule.rule
            or rule.rule.endswith(("/end", "/revoke"))
        )
    ]
    character = st.one_of(st.characters(), st.sampled_from(["\x00", "%", "&", "=", "+", "\uffff"]))
    pair = st.tuples(st.sampled_from(fields) | st.text(character, max_size=5), st.text(character, max_size=40))

    @st.composite
    def form_body(draw):
        raw = "&".join(f"{key}={value}" for key, value in draw(st.lists(pair, max_size=5)))
        data = raw.encode("utf-8", "surrogatepass")
        if draw(st.booleans()):
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
        return data

    @fuzz_settings()
    @given(target=st.sampled_from(posts), body=form_body())
    def check(target, body):
        response = browser.post(fill(target, ids), data=body, content_type="application/x-www-form-urlencoded")
        assert_no_server_error(response, (target, body[:200]), api=False)
        assert app.extensions["chatapp.reply_runner"].wait_idle(30)
        assert_no_errors_logged(caplog)

    check()


def test_every_page_with_malformed_query_strings(app, client, owner, caplog):
    caplog.set_level(logging.WARNING)
    browser, ids = web_session(app, client, owner.username)
    for rule, method in routes(app, prefix_api=False):
        if method != "GET":
            continue
        url = fill(rule.rule, ids)
        for name in ("older", "before", "next"):
            for value in BAD_QUERY_VALUES[:12]:
                response = browser.get(f"{url}?{name}={value}")
                assert response.status_code < 500, (url, name, value, response.status_code)
    assert_no_errors_logged(caplog)


# --- what is stored is shown back: Markdown and pages with any character ---------------------------


def test_any_storable_text_round_trips_and_renders(app, client, owner, caplog):
    """Text the API accepts (non-characters, controls, astral planes) is stored, listed,
    streamed and rendered as Markdown on the conversation page."""
    caplog.set_level(logging.WARNING)
    browser, _ids = web_session(app, client, owner.username)
    headers = {
        "Authorization": f"Bearer {client.post('/api/v1/tokens', json={'username': owner.username, 'password': PASSWORD}).get_json()['token']}"
    }
    conversation_id = client.post("/api/v1/conversations", json={}, headers=headers).get_json()["id"]
    url = f"/api/v1/conversations/{conversation_id}/messages"
    storable = st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=60
    ).filter(str.strip)

    @fuzz_settings(max(5, EXAMPLES // 3))
    @given(text=storable)
    def check(text):
        posted = client.post(
            url,
            json={
                "content": text,
            },
            headers=headers,
        )
        assert posted.status_code == 202, posted.get_data(as_text=True)[:300]
        assert app.extensions["chatapp.reply_runner"].wait_idle(30)
        reply = posted.get_json()["reply"]["id"]
        assert client.get(f"{url}/{reply}/stream", headers=headers).status_code == 200
        assert client.get(url, headers=headers, query_string={"limit": 100}).status_code == 200
        title = client.patch(f"/api/v1/conversations/{conversation_id}", json={"title": text[:200]}, headers=headers)
        assert title.status_code == 200
        page = browser.get(f"/c/{conversation_id}")
        assert page.status_code == 200
        assert_no_errors_logged(caplog)

    check()


@pytest.mark.parametrize(
    "body, kind",
    [(b"[]", "an array"), (b'"x"', "a string"), (b"1.5", "a number"), (b"null", "null"), (b"false", "a boolean")],
)
def test_a_body_that_is_not_an_object_says_so(client, owner, body, kind):
    response = client.post("/api/v1/conversations", data=body, content_type="application/json", headers=owner.headers)
    assert_api_refusal(response, body)
    assert response.status_code == 422
    assert response.get_json()["error"]["message"] == f"the body must be a JSON object, not {kind}"
