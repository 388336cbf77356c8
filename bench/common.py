"""What every benchmark shares: databases, gunicorn servers, seeding, load, measurements.

Nothing here is timed by a test. Every server binds a free port on 127.0.0.1, every
database is created for the run and dropped after it, and every process started here
is stopped by its own pid.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

PG_URL_VARS = ("CHATAPP_BENCH_POSTGRES_URL", "CHATAPP_TEST_DATABASE_URL")
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PASSWORD = "bench-password"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --- process hygiene ------------------------------------------------------------------

_cleanups: list = []


def on_exit(callback) -> None:
    """Run ``callback`` when the script ends, even on Ctrl-C or SIGTERM."""
    _cleanups.append(callback)


def _run_cleanups() -> None:
    while _cleanups:
        callback = _cleanups.pop()
        with contextlib.suppress(Exception):
            callback()


atexit.register(_run_cleanups)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _terminate)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- databases ------------------------------------------------------------------------


def postgres_base_url() -> str:
    for name in PG_URL_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return PG_DEFAULT


def postgres_available() -> tuple[bool, str]:
    import psycopg
    import sqlalchemy as sa

    url = sa.make_url(postgres_base_url())
    try:
        psycopg.connect(_admin_dsn(url), connect_timeout=3).close()
        return True, ""
    except psycopg.OperationalError as exc:
        return False, str(exc).strip().splitlines()[0]


def _admin_dsn(url) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class Database:
    """A migrated, empty chatapp database for one benchmark: a SQLite file or a PostgreSQL database."""

    def __init__(self, backend: str, workdir: Path):
        import sqlalchemy as sa

        self.backend = backend
        self.name = None
        if backend == "sqlite":
            self.uri = f"sqlite:///{workdir / f'bench-{secrets.token_hex(3)}.sqlite'}"
        elif backend == "postgresql":
            base = sa.make_url(postgres_base_url())
            self.name = f"chatapp_bench_{os.getpid()}_{secrets.token_hex(3)}"
            self.admin = base
            self.uri = base.set(database=self.name).render_as_string(hide_password=False)
        else:
            raise ValueError(backend)

    def __enter__(self) -> Database:
        if self.name:
            import psycopg

            with psycopg.connect(_admin_dsn(self.admin), autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            on_exit(self.drop)
        migrate(self.uri)
        return self

    def __exit__(self, *exc) -> None:
        self.drop()

    def drop(self) -> None:
        if self.name and not getattr(self, "_dropped", False):
            import psycopg

            with psycopg.connect(_admin_dsn(self.admin), autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self._dropped = True

    def pg_states(self) -> dict[str, int]:
        """pg_stat_activity states of the connections to this database (PostgreSQL only)."""
        if not self.name:
            return {}
        import psycopg

        with psycopg.connect(_admin_dsn(self.admin), autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT coalesce(state, '?'), count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid() GROUP BY 1",
                (self.name,),
            ).fetchall()
        return {state: count for state, count in rows}


def migrate(database_uri: str) -> None:
    """``flask init-db``, the real CLI, as tests/servers.py does."""
    env = {**os.environ, "CHATAPP_SQLALCHEMY_DATABASE_URI": database_uri, "CHATAPP_SECRET_KEY": secrets.token_hex(32)}
    subprocess.run(
        [sys.executable, "-m", "flask", "--app", "chatapp", "init-db"],
        env=env, check=True, capture_output=True, cwd=ROOT, timeout=120,
    )


def backends(requested: list[str]) -> list[str]:
    """The backends to run; PostgreSQL is left out (with a note) when it cannot be reached."""
    chosen = []
    for backend in requested:
        if backend == "postgresql":
            ok, why = postgres_available()
            if not ok:
                print(f"# PostgreSQL at {postgres_base_url()} unreachable ({why}); skipping it", flush=True)
                continue
        chosen.append(backend)
    return chosen


@dataclass
class Seeded:
    token: str
    user_id: int
    conversation_ids: list[int]


def seed(database_uri: str, *, conversations: int, messages: int = 0, username: str = "bench") -> Seeded:
    """One user, one API token, ``conversations`` conversations; ``messages`` complete
    messages (alternating user/assistant) in the first one. Written with chatapp's own
    services, in this process, so every app benchmarked reads the same rows."""
    from chatapp import create_app
    from chatapp.auth import services as auth
    from chatapp.chat import services as chat
    from chatapp.chat.models import Message, Role, Status
    from chatapp.db import db, unit_of_work, utcnow

    app = create_app({
        "TESTING": True, "SECRET_KEY": "bench", "SQLALCHEMY_DATABASE_URI": database_uri,
        "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000", "REPLY_SWEEP_INTERVAL": 0,
        "RATELIMIT_ENABLED": False,
    })
    try:
        with unit_of_work(app):
            user = auth.create_user(username, PASSWORD)
            _row, token = auth.create_token(user.id, name="bench")
            ids = [chat.create_conversation(user.id, f"bench {i}").id for i in range(conversations)]
            user_id = user.id
        if messages and ids:
            with unit_of_work(app) as session:
                now = utcnow()
                session.add_all([
                    Message(
                        conversation_id=ids[0], role=Role.USER if i % 2 == 0 else Role.ASSISTANT,
                        content=f"message {i}: the quick brown fox jumps over the lazy dog",
                        status=Status.COMPLETE, created_at=now, updated_at=now,
                    )
                    for i in range(messages)
                ])
    finally:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()
    return Seeded(token, user_id, ids)


# --- servers --------------------------------------------------------------------------


class Server:
    """gunicorn -c gunicorn.conf.py APP on a free loopback port, its log in ``workdir``.

    ``workers``/``threads`` None: gunicorn.conf.py decides (the shipped defaults).
    ``env``: extra variables (CHATAPP_* settings for chatapp, BENCH_* for the bench apps).
    """

    def __init__(self, app: str, database_uri: str, workdir: Path, *, name: str,
                 workers: int | None = None, threads: int | None = None, env: dict | None = None):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "CHATAPP_SECRET_KEY": secrets.token_hex(32),
            "CHATAPP_SQLALCHEMY_DATABASE_URI": database_uri,
            "PYTHONUNBUFFERED": "1",
            # A bench loads the server through one user: the per-user bounds, which keep one
            # user from taking the server from the others, would refuse it. The checks still
            # run, at the cost they have in production.
            "CHATAPP_RATELIMIT_MESSAGES": "1000000 per minute",
            "CHATAPP_RATELIMIT_REGENERATE": "1000000 per minute",
            "CHATAPP_RATELIMIT_CONVERSATIONS": "1000000 per minute",
            "CHATAPP_STREAMS_PER_USER": "100000",
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn.conf.py makes one per server
        for key, value in (env or {}).items():
            self.env[key] = str(value)
        self.args = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
                     "--bind", f"127.0.0.1:{self.port}"]
        if workers is not None:
            self.args += ["--workers", str(workers)]
        if threads is not None:
            self.args += ["--threads", str(threads)]
        self.args.append(app)
        self.log_path = workdir / f"gunicorn-{name}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Server:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - gunicorn writes to it until stop()
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        on_exit(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name}: gunicorn exited early:\n{self.log_tail()}")
            try:
                # Every worker up, not only the first to answer.
                if (requests.get(self.url + "/healthz", timeout=1).status_code == 200
                        and len(self.worker_pids()) >= self.expected_workers()):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name}: gunicorn did not start in {timeout} s:\n{self.log_tail()}")

    def expected_workers(self) -> int:
        if "--workers" in self.args:
            return int(self.args[self.args.index("--workers") + 1])
        return int(self.env.get("CHATAPP_WORKERS", "2"))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            children = subprocess.run(["pgrep", "-P", str(self.process.pid)],
                                      capture_output=True, text=True).stdout
        return sorted(int(pid) for pid in children.split())

    def cpu_seconds(self) -> float:
        """User + system CPU of the master and its current workers."""
        pids = [self.process.pid, *self.worker_pids()] if self.process else []
        return sum(process_cpu_seconds(pid) for pid in pids)

    def rss_kb(self) -> dict[int, int]:
        return {pid: process_rss_kb(pid) for pid in self.worker_pids()}

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            workers = self.worker_pids()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            for pid in workers:  # a worker that outlived its master (never seen, but bounded)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def process_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ")" field 3 is the state: utime and stime are fields 14 and 15 overall.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_rss_kb(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    except OSError:
        return 0


# --- /metrics -------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def fetch_metrics(url: str, timeout: float = 5.0) -> list[tuple[str, dict, float]] | None:
    """Samples from GET /metrics, or None when the app has no /metrics."""
    try:
        response = requests.get(url + "/metrics", timeout=timeout)
    except requests.RequestException:
        return None
    if response.status_code != 200 or "text/plain" not in response.headers.get("Content-Type", ""):
        return None
    return parse_metrics(response.text)


def checked_out_by_pid(samples) -> dict[str, float]:
    """chatapp_db_pool_checked_out per worker pid (summed over binds)."""
    out: dict[str, float] = {}
    for name, labels, value in samples or []:
        if name == "chatapp_db_pool_checked_out":
            pid = labels.get("pid", "?")
            out[pid] = out.get(pid, 0.0) + value
    return out


def requests_with_status(samples, status: str) -> float:
    return sum(value for name, labels, value in samples or []
               if name == "chatapp_http_requests_total" and labels.get("status") == status)


class MetricsSampler:
    """Polls /metrics in a thread and keeps, per worker, the highest pool checkout seen."""

    def __init__(self, url: str, interval: float = 0.25):
        self.url = url
        self.interval = interval
        self.max_by_pid: dict[str, float] = {}
        self.samples = 0
        self.failed = 0
        self.available: bool | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                response = session.get(self.url + "/metrics", timeout=10)
                if response.status_code == 200:
                    by_pid = checked_out_by_pid(parse_metrics(response.text))
                    if self.available is None:
                        self.available = bool(by_pid) or "chatapp_" in response.text
                    for pid, value in by_pid.items():
                        self.max_by_pid[pid] = max(self.max_by_pid.get(pid, 0.0), value)
                    self.samples += 1
                else:
                    if self.available is None and response.status_code == 404:
                        self.available = False
                        return
                    self.failed += 1
            except requests.RequestException:
                self.failed += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


# --- load -----------------------------------------------------------------------------


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
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
           "--latency", "--timeout", "10s"]
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
    socket = sum(int(x) for x in m.groups()) if (
        m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)) else 0
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    return LoadResult(
        tool="wrk", seconds=seconds_measured, requests=total, rps=total / seconds_measured,
        non_2xx=non_2xx, socket_errors=socket,
        p50_ms=_to_ms(pct.get("50", "")), p99_ms=_to_ms(pct.get("99", "")),
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
        tool="python", seconds=wall, requests=total, rps=total / wall,
        non_2xx=sum(count for code, count in statuses.items() if not 200 <= code < 400),
        socket_errors=errors[0],
        p50_ms=percentile(latencies, 50) * 1000, p99_ms=percentile(latencies, 99) * 1000,
        loader_cpu_seconds=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )


def load(url: str, *, headers: dict, seconds: float, connections: int, tool: str = "auto") -> LoadResult:
    if tool == "wrk" or (tool == "auto" and have_wrk()):
        return run_wrk(url, headers=headers, seconds=seconds, connections=connections)
    return run_python_load(url, headers=headers, seconds=seconds, connections=connections)


# --- SSE ------------------------------------------------------------------------------


def read_stream(session: requests.Session, url: str, timeout: tuple = (10, 120)) -> tuple[str, str | None, int]:
    """Read a reply's SSE stream to its ``done`` event: (text, final status, HTTP status)."""
    text, status = [], None
    with session.get(url, stream=True, timeout=timeout) as response:
        if response.status_code != 200:
            return "", None, response.status_code
        event = None
        # Bytes, split on CR, LF and CRLF only (the SSE line terminators); decoded text
        # would also be split at U+2028 and the like, which are not line ends in SSE.
        for line in response.iter_lines(decode_unicode=False):
            raw = line.decode("utf-8")
            if raw.startswith("event: "):
                event = raw[7:]
            elif raw.startswith("data: "):
                if event == "done":
                    status = json.loads(raw[6:])["status"]
                    break
                if event is None:
                    text.append(raw[6:])
            elif raw == "":
                event = None
    return "".join(text), status, 200


def error_code(response: requests.Response) -> str:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return ""


# --- reporting ------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


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
    for name in ("Flask", "Flask-SQLAlchemy", "SQLAlchemy", "gunicorn", "psycopg", "Werkzeug",
                 "flask-smorest", "prometheus_client", "requests"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages.append(f"{name} {metadata.version(name)}")
    pg = "?"
    with contextlib.suppress(Exception):
        import psycopg
        import sqlalchemy as sa

        with psycopg.connect(_admin_dsn(sa.make_url(postgres_base_url())), connect_timeout=3) as conn:
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
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + " |" for row in cells]
    return "\n".join(out)


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chatapp-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"# logs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def write_json(path: str | None, data) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))


def fmt(value: float, digits: int = 1) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


class PgSampler:
    """Polls pg_stat_activity for one database: the most connections seen per state."""

    def __init__(self, database: Database, interval: float = 0.5):
        self.database = database
        self.interval = interval
        self.max_by_state: dict[str, int] = {}
        self.max_total = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                states = self.database.pg_states()
                self.samples += 1
                self.max_total = max(self.max_total, sum(states.values()))
                for state, count in states.items():
                    self.max_by_state[state] = max(self.max_by_state.get(state, 0), count)
            self._stop.wait(self.interval)

    def __enter__(self) -> PgSampler:
        if self.database.name:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)


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
        out[holder] = {"count": int(count), "mean_ms": 1000 * sums.get(holder, 0.0) / count,
                       "p99_le_s": p99, "max_le_s": top}
    return out


def format_holds(summary: dict[str, dict]) -> str:
    return "; ".join(
        f"{holder}: {s['count']} holds, mean {s['mean_ms']:.1f} ms, 99% <= {s['p99_le_s']:g} s, all <= {s['max_le_s']:g} s"
        for holder, s in sorted(summary.items(), key=lambda item: -item[1]["count"])
    )


def connections_by_worker(server: Server) -> dict[int, int]:
    """Established client connections held by each worker now (``ss``), to see how the
    kernel's accept race spread keep-alive clients over the workers."""
    try:
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{server.port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return {pid: n for pid, n in counts.items() if pid in server.worker_pids()}


def rss_by_mapping(pid: int, top: int = 6) -> list[tuple[str, int]]:
    """Resident kB of a process by mapping (file path, [heap], or anonymous), largest first."""
    totals: dict[str, int] = {}
    name = "?"
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    parts = line.split()
                    name = parts[5] if len(parts) > 5 else "[anon]"
                elif first == "Rss:":
                    totals[name] = totals.get(name, 0) + int(line.split()[1])
    except OSError:
        return []
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


def process_threads(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
