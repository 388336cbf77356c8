"""What a benchmark prints: the machine it ran on, tables, figures; and the raw figures as JSON."""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import subprocess
from pathlib import Path

from bench.databases import bench_postgres_url
from bench.load import have_wrk
from tests.support.databases import admin_dsn


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_report() -> str:
    """The header every benchmark prints: when, where, with what."""
    from importlib import metadata

    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    packages = []
    for name in (
        "Flask",
        "Flask-SQLAlchemy",
        "SQLAlchemy",
        "gunicorn",
        "psycopg",
        "Werkzeug",
        "flask-smorest",
        "prometheus_client",
        "requests",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages.append(f"{name} {metadata.version(name)}")
    pg = "?"
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(admin_dsn(bench_postgres_url()), connect_timeout=3) as conn:
            pg = conn.execute("SHOW server_version").fetchone()[0]
    import sqlite3

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    wrk = run(["wrk", "--version"]).splitlines()[0] if have_wrk() else "not installed (Python load generator)"
    lines = [
        f"date: {run(['date', '-u', '+%Y-%m-%d %H:%M:%S UTC'])}",
        f"nproc: {run(['nproc'])} ({cpu})",
        "free -h:",
        *("    " + line for line in run(["free", "-h"]).splitlines()),
        f"python: {platform.python_version()} ({platform.platform()})",
        f"packages: {', '.join(packages)}",
        f"SQLite: {sqlite3.sqlite_version}; PostgreSQL server: {pg}",
        f"wrk: {wrk}",
        f"load average at start: {loadavg()}",
    ]
    return "\n".join(lines)


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table, readable as plain text too."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    out = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + " |" for row in cells]
    return "\n".join(out)


def write_json(path: str | None, data) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))


def fmt(value: float, digits: int = 1) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def print_verdicts(verdicts: list[str]) -> None:
    """The targets met or missed, one line each, after the table."""
    print()
    for line in verdicts:
        print("- " + line)


def finish(json_path: str | None, data) -> None:
    """What every benchmark ends with: the load average (the machine is shared), the JSON."""
    print(f"load average at end: {loadavg()}")
    write_json(json_path, data)
