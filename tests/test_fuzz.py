"""Schemathesis against /api/v1/openapi.json: no 5xx, no response outside the schema, bad input refused.

Each operation gets CHATAPP_FUZZ_EXAMPLES examples of valid data and as many of invalid
data (default 20, derandomized so that CI runs are repeatable). For a long hunt:

    CHATAPP_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.core.parameters import ParameterLocation

EXAMPLES = int(os.environ.get("CHATAPP_FUZZ_EXAMPLES", "20"))
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def seed(app, client, auth) -> dict:
    """A user whose conversation 1 has a finished reply, so small ids hit real rows too."""
    headers = auth.headers("fuzzer")
    conversation = client.post("/api/v1/conversations", json={"title": "seed"}, headers=headers).get_json()
    client.post(f"/api/v1/conversations/{conversation['id']}/messages", json={"content": "seed"}, headers=headers)
    assert app.extensions["chatapp.reply_runner"].wait_idle(30)
    return headers


def run_operation(operation, mode: GenerationMode, headers_for) -> None:
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        # Shrinking would only slow a failing run down; the first example is reported as is.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        if mode is GenerationMode.POSITIVE and case.query and "cursor" in case.query:
            # A cursor is an opaque token from next_cursor; a made-up one is rightly refused (422).
            case.query.pop("cursor")
        if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
            # The case's fault is in its headers (a missing or broken token): send them as made.
            case.call_and_validate()
        else:
            # A real token, passed as the caller's own: Schemathesis then also checks that
            # the same request without it, or with a wrong one, is refused.
            case.call_and_validate(headers=headers_for(case))

    check()


def test_api_fuzz(app, client, auth):
    headers = seed(app, client, auth)
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)

    def headers_for(case):
        if case.path.endswith("/tokens/current"):
            # Revoking must not revoke the token every other case uses.
            return {"Authorization": f"Bearer {auth.token('fuzzer')}"}
        return headers

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    failures = []
    for operation in operations:
        for mode in MODES:
            try:
                run_operation(operation, mode, headers_for)
            except Exception as exc:  # collect every operation's failure, then report them all
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    assert not failures, "\n\n".join(failures)
