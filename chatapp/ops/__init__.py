"""What operators see: request ids for the access log, and Prometheus metrics at /metrics."""

from __future__ import annotations

from flask import Flask

from chatapp.ops import metrics, request_id


def init_app(app: Flask) -> None:
    """Call after db.init_app: metrics watch the engines it created."""
    request_id.init_app(app)
    metrics.init_app(app)
