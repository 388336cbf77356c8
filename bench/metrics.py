"""What a benchmark samples while it runs: chatapp's /metrics (pool checkouts per worker,
connection hold times by holder) and PostgreSQL's pg_stat_activity."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import requests

from tests.support.metrics import by_label, parse

if TYPE_CHECKING:
    from bench.databases import Database


def checked_out_by_pid(samples) -> dict[str, float]:
    """chatapp_db_pool_checked_out per worker pid (summed over binds)."""
    return by_label(samples, "chatapp_db_pool_checked_out", "pid")


class Sampler:
    """Calls ``sample()`` every ``interval`` seconds in a thread, from ``with`` to its end."""

    def __init__(self, interval: float):
        self.interval = interval
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> bool:
        """Take one sample; False stops the sampling."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set() and self.sample() is not False:
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


class MetricsSampler(Sampler):
    """Polls /metrics and keeps, per worker, the highest pool checkout seen."""

    def __init__(self, url: str, interval: float = 0.25):
        super().__init__(interval)
        self.url = url
        self.max_by_pid: dict[str, float] = {}
        self.failed = 0
        self.available: bool | None = None
        self.session = requests.Session()

    def sample(self) -> bool:
        try:
            response = self.session.get(self.url + "/metrics", timeout=10)
            if response.status_code == 200:
                by_pid = checked_out_by_pid(parse(response.text))
                if self.available is None:
                    self.available = bool(by_pid) or "chatapp_" in response.text
                for pid, value in by_pid.items():
                    self.max_by_pid[pid] = max(self.max_by_pid.get(pid, 0.0), value)
                self.samples += 1
            elif self.available is None and response.status_code == 404:
                self.available = False
                return False  # an app without /metrics
            else:
                self.failed += 1
        except (requests.RequestException, ValueError):  # ValueError: not Prometheus text
            self.failed += 1
        return True


class PgSampler(Sampler):
    """Polls pg_stat_activity for one database: the most connections seen per state
    (nothing on SQLite)."""

    def __init__(self, database: Database, interval: float = 0.5):
        super().__init__(interval)
        self.database = database
        self.max_by_state: dict[str, int] = {}
        self.max_total = 0

    def sample(self) -> bool:
        if not self.database.name:
            return False
        with contextlib.suppress(Exception):
            states = self.database.pg_states()
            self.samples += 1
            self.max_total = max(self.max_total, sum(states.values()))
            for state, count in states.items():
                self.max_by_state[state] = max(self.max_by_state.get(state, 0), count)
        return True


def hold_summary(samples) -> dict[str, dict]:
    """chatapp_db_connection_hold_seconds per holder: count, mean, and the bucket bounds
    (seconds, "le") under which 99% and all of the holds fell. Summed over workers."""
    buckets: dict[str, dict[float, float]] = {}
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for name, labels, value in samples or []:
        holder = labels.get("holder")
        if holder is None:
            continue
        if name == "chatapp_db_connection_hold_seconds_bucket":
            bound = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
            per = buckets.setdefault(holder, {})
            per[bound] = per.get(bound, 0.0) + value
        elif name == "chatapp_db_connection_hold_seconds_count":
            counts[holder] = counts.get(holder, 0.0) + value
        elif name == "chatapp_db_connection_hold_seconds_sum":
            sums[holder] = sums.get(holder, 0.0) + value
    out = {}
    for holder, count in counts.items():
        if not count:
            continue
        cumulative = sorted(buckets.get(holder, {}).items())
        p99 = next((bound for bound, n in cumulative if n >= 0.99 * count), float("inf"))
        top = next((bound for bound, n in cumulative if n >= count), float("inf"))
        out[holder] = {
            "count": int(count),
            "mean_ms": 1000 * sums.get(holder, 0.0) / count,
            "p99_le_s": p99,
            "max_le_s": top,
        }
    return out


def format_holds(summary: dict[str, dict]) -> str:
    return "; ".join(
        f"{holder}: {s['count']} holds, mean {s['mean_ms']:.1f} ms, 99% <= {s['p99_le_s']:g} s, all <= {s['max_le_s']:g} s"
        for holder, s in sorted(summary.items(), key=lambda item: -item[1]["count"])
    )
