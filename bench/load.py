"""The throughput load generator: as many keep-alive GETs of one URL as the server answers,
for a while, with wrk (C, epoll: the cheapest here, so the server gets the CPU) or, when wrk
is not installed, Python threads. It reports requests/s, latency percentiles and its own
CPU. (tests/support/load.py is the other kind: paced clients whose every call is recorded.)
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

from tests.support.load import percentile


@dataclass
class LoadResult:
    tool: str
    seconds: float
    requests: int
    rps: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    loader_cpu_seconds: float
    server_cpu_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def loader_cpu_pct(self) -> float:
        return 100.0 * self.loader_cpu_seconds / self.seconds if self.seconds else float("nan")

    @property
    def server_cpu_pct(self) -> float:
        return 100.0 * self.server_cpu_seconds / self.seconds if self.seconds else float("nan")


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, *, headers: dict, seconds: float, connections: int, threads: int = 1) -> LoadResult:
    """wrk (C, epoll): the cheapest load generator here, so the server gets the CPU."""
    cmd = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    for key, value in headers.items():
        cmd += ["-H", f"{key}: {value}"]
    cmd.append(url)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr or out}")
    total = int(re.search(r"(\d+) requests in", out).group(1))
    duration = re.search(r"requests in ([\d.]+)(us|ms|s|m)", out)
    seconds_measured = _to_ms(duration.group(1) + duration.group(2)) / 1000 if duration else wall
    non_2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    socket = (
        sum(int(x) for x in m.groups())
        if (m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out))
        else 0
    )
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    return LoadResult(
        tool="wrk",
        seconds=seconds_measured,
        requests=total,
        rps=total / seconds_measured,
        non_2xx=non_2xx,
        socket_errors=socket,
        p50_ms=_to_ms(pct.get("50", "")),
        p99_ms=_to_ms(pct.get("99", "")),
        loader_cpu_seconds=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )


def run_python_load(url: str, *, headers: dict, seconds: float, connections: int) -> LoadResult:
    """Fallback when wrk is not installed: keep-alive http.client connections, one thread each."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker():
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        mine, codes, failed = [], {}, 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                response.read()
                codes[response.status] = codes.get(response.status, 0) + 1
                mine.append(time.perf_counter() - started)
            except (OSError, http.client.HTTPException):
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.close()
        with lock:
            latencies.extend(mine)
            for code, count in codes.items():
                statuses[code] = statuses.get(code, 0) + count
            errors[0] += failed

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    total = sum(statuses.values())
    return LoadResult(
        tool="python",
        seconds=wall,
        requests=total,
        rps=total / wall,
        non_2xx=sum(count for code, count in statuses.items() if not 200 <= code < 400),
        socket_errors=errors[0],
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        loader_cpu_seconds=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )


def load(url: str, *, headers: dict, seconds: float, connections: int, tool: str = "auto") -> LoadResult:
    if tool == "wrk" or (tool == "auto" and have_wrk()):
        return run_wrk(url, headers=headers, seconds=seconds, connections=connections)
    return run_python_load(url, headers=headers, seconds=seconds, connections=connections)
