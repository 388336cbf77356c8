"""Samples from chatapp's /metrics page (Prometheus text format), for tests and benchmarks."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict, float]  # (sample name, labels, value)


def parse(text: str) -> list[Sample]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def scrape(url: str, timeout: float = 10.0) -> list[Sample] | None:
    """The samples of GET ``url``/metrics; None when the server has no /metrics (the
    benchmarks' comparison apps) or does not answer."""
    try:
        response = requests.get(url + "/metrics", timeout=timeout)
    except requests.RequestException:
        return None
    if response.status_code != 200 or "text/plain" not in response.headers.get("Content-Type", ""):
        return None
    return parse(response.text)


def total(samples: list[Sample] | None, name: str, **labels) -> float:
    """Sum of a sample over every label set that includes ``labels`` (e.g. across pids)."""
    wanted = set(labels.items())
    return sum(
        value
        for sample, sample_labels, value in samples or []
        if sample == name and wanted <= set(sample_labels.items())
    )


def by_label(samples: list[Sample] | None, name: str, label: str) -> dict[str, float]:
    """A sample summed per value of one label, e.g. chatapp_db_pool_checked_out per worker pid."""
    out: dict[str, float] = {}
    for sample, labels, value in samples or []:
        if sample == name:
            key = labels.get(label, "?")
            out[key] = out.get(key, 0.0) + value
    return out
