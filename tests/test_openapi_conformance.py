"""The OpenAPI document says what the API does: Schemathesis' coverage phase (the requests
a document's edges imply: each required part missing, each value at and past its bounds) with
the checks that compare the two, positive data accepted and negative data refused.

Bounded: a few examples an operation, derandomized; CHATAPP_FUZZ_EXAMPLES raises them.
The document and the validation do not depend on the database: SQLite only.
"""

from __future__ import annotations

import os
import re
import uuid

import pytest
import schemathesis
from hypothesis import example, given
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import from_schema
from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER

from chatapp.chat.services import CURSOR_PATTERN
from tests.test_fuzz import seed
from tests.test_malformed_input import fuzz_settings

EXAMPLES = int(os.environ.get("CHATAPP_FUZZ_EXAMPLES", "5"))
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "positive_data_acceptance",
    "negative_data_rejection",
    "missing_required_header",
]


@pytest.fixture
def sqlite_only(backend):
    if backend != "sqlite":
        pytest.skip("the document and request validation are the same on every database")


def conformance_failures(app, headers: dict, cursors: dict[str, str]) -> list[str]:
    config = SchemathesisConfig.from_dict(
        {
            # Through the document's security scheme, so a case without credentials goes without.
            "auth": {"openapi": {"bearer": {"bearer": headers["Authorization"].removeprefix("Bearer ")}}},
            # Values only the server can give: a cursor is valid when a page of its list gave it.
            "operations": [
                {"include-name": f"GET {path}", "parameters": {"cursor": cursor}} for path, cursor in cursors.items()
            ],
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            "phases": {
                "coverage": {"enabled": True},
                "examples": {"enabled": False},
                "fuzzing": {"enabled": False},
                "stateful": {"enabled": False},
            },
            "generation": {"max-examples": EXAMPLES, "deterministic": True},
        }
    )
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app, config=config)
    # Revoking the token or ending logins would end the run's own credentials.
    schema = schema.exclude(method="DELETE")

    def fresh_idempotency_key(ctx, case, **kwargs):
        # A key names one message: used again with other content it is rightly refused (422).
        key = (case.headers or {}).get("Idempotency-Key")
        if isinstance(key, str) and re.fullmatch(r"[ -~]{1,60}", key):
            case.headers["Idempotency-Key"] = f"{key}-{uuid.uuid4()}"

    schemathesis.hook("before_call")(fresh_idempotency_key)
    try:
        return _run(schema)
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(fresh_idempotency_key)


def _run(schema) -> list[str]:
    failures = []
    for event in from_schema(schema).execute():
        name = type(event).__name__
        if name in ("NonFatalError", "FatalError"):
            failures.append(f"{name}: {event.info if hasattr(event, 'info') else event}")
        recorder = getattr(event, "recorder", None)
        if name != "ScenarioFinished" or recorder is None:
            continue
        for case_id, checks in recorder.checks.items():
            for check in checks:
                if check.status.name == "FAILURE":
                    case = recorder.cases[case_id].value
                    failures.append(
                        f"{check.name}: {case.method} {case.formatted_path} query={case.query} "
                        f"headers={ {k: v for k, v in (case.headers or {}).items() if k != 'Authorization'} } "
                        f"body={case.body!r:.100}: {check.failure_info.failure if check.failure_info else ''}"
                    )
    return sorted(set(failures))


def test_the_document_describes_what_the_api_accepts_and_refuses(app, client, auth, sqlite_only):
    headers = seed(app, client, auth)
    # A real cursor of each list, from a page of one.
    client.post("/api/v1/conversations", json={"title": "second"}, headers=headers)
    cursors = {
        path: client.get(path.replace("{conversation_id}", "1"), query_string={"limit": 1}, headers=headers).get_json()[
            "next_cursor"
        ]
        for path in ("/api/v1/conversations", "/api/v1/conversations/{conversation_id}/messages")
    }
    assert all(cursors.values()), cursors
    failures = conformance_failures(app, headers, cursors)
    assert not failures, "\n".join(failures)


def test_a_cursor_outside_the_documented_pattern_is_refused(app, client, auth, sqlite_only):
    """The pattern is the cursors' whole syntax: what it refuses, the API refuses; what it
    admits is read (a value no page gave is then refused too, with the same message)."""
    headers = auth.headers("cursors")
    conversation = client.post("/api/v1/conversations", json={}, headers=headers).get_json()
    urls = ["/api/v1/conversations", f"/api/v1/conversations/{conversation['id']}/messages"]

    @fuzz_settings(50)
    # Base64 decoders skip stray characters and padding; the API does not.
    @example(cursor="MTIz=")
    @example(cursor="MT.Iz")
    @example(cursor="M TIz")
    @example(cursor="MTIz\n")
    @example(cursor="0")
    @given(
        cursor=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
        | st.from_regex(CURSOR_PATTERN, fullmatch=True).filter(lambda text: 0 < len(text) <= 200)
    )
    def check(cursor):
        for url in urls:
            response = client.get(url, query_string={"cursor": cursor}, headers=headers)
            if not re.fullmatch(CURSOR_PATTERN, cursor):
                assert response.status_code == 422, (url, cursor, response.status_code)
            assert response.status_code in (200, 422), (url, cursor, response.status_code)
            if response.status_code == 422:
                assert "cursor" in response.get_json()["error"]["message"]

    check()
