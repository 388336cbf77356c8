"""Liveness and readiness probes."""

from __future__ import annotations

import concurrent.futures

import sqlalchemy as sa
from flask import Blueprint, Flask, current_app

from chatapp.db import transaction, unit_of_work
from chatapp.errors.handlers import error_response

bp = Blueprint("health", __name__)
READY_TIMEOUT_SECONDS = 2.0
# A small pool of its own, so a hanging database cannot pile up request threads.
_probe_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="readyz")


@bp.get("/healthz")
@transaction("none")
def healthz():
    """Liveness: answers without touching the database."""
    return {"status": "ok"}


def _select_one(app: Flask) -> None:
    with unit_of_work(app, write=False) as session:
        session.execute(sa.text("SELECT 1"))


@bp.get("/readyz")
@transaction("none")
def readyz():
    """Readiness: 200 when the database answers SELECT 1 within 2 s, else 503."""
    future = _probe_pool.submit(_select_one, current_app._get_current_object())  # type: ignore[attr-defined]  # LocalProxy method
    try:
        future.result(timeout=READY_TIMEOUT_SECONDS)
    except concurrent.futures.TimeoutError:
        return error_response(503, "database_unavailable", "the database did not answer within 2 s")
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return error_response(503, "database_unavailable", f"the database is unavailable: {type(exc).__name__}")
    return {"status": "ok"}
