"""PgBouncer in transaction pooling mode in front of the test PostgreSQL server.

With ``CHATAPP_TEST_PGBOUNCER=1`` (``.ci/run`` sets it) the PostgreSQL half of the suite
runs through a PgBouncer started for the run: ``CHATAPP_TEST_DATABASE_URL`` names the
PostgreSQL server itself, which the helpers that need the real server use (creating and
dropping databases, pg_stat_activity, terminating backends: ``databases.admin_dsn``), while
every app, server and CLI the tests start connects through PgBouncer, with
``CHATAPP_DATABASE_POOLER=pgbouncer`` set as an operator would. Unset or ``0``: the apps
connect to PostgreSQL directly.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import sqlalchemy as sa

ENV_VAR = "CHATAPP_TEST_PGBOUNCER"
# Running PgBouncers of this process: their (host, port) -> the server's (host, port).
_SERVERS: dict[tuple[str, int], tuple[str, int]] = {}


def requested() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false", "no")


def binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(path, os.X_OK)), None
    )


def direct(url: str | sa.URL) -> sa.URL:
    """``url`` with PgBouncer's address replaced by the PostgreSQL server's, when it names a test PgBouncer."""
    url = sa.make_url(url)
    server = _SERVERS.get((url.host or "127.0.0.1", url.port or 5432))
    return url if server is None else url.set(host=server[0], port=server[1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgBouncer:
    """A PgBouncer daemon in transaction pooling mode in front of the server of ``server_url``.

    Every database of that server is reachable through it under its own name (a wildcard
    entry); user ``postgres`` is trusted, as the test server trusts it. ``pool_size``:
    server connections per database (``default_pool_size``).
    """

    def __init__(self, server_url: str | sa.URL, *, pool_size: int = 20, max_client_conn: int = 2000):
        server = sa.make_url(server_url)
        self.server = (server.host or "127.0.0.1", server.port or 5432)
        self.user = server.username or "postgres"
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.directory: Path | None = None
        self.pid: int | None = None

    def url_for(self, url: str | sa.URL) -> str:
        """The same database as ``url``, through this PgBouncer."""
        return sa.make_url(url).set(host=self.host, port=self.port).render_as_string(hide_password=False)

    def _config(self, directory: Path) -> str:
        return "\n".join(
            [
                "[databases]",
                f"* = host={self.server[0]} port={self.server[1]}",
                "[pgbouncer]",
                f"listen_addr = {self.host}",
                f"listen_port = {self.port}",
                # No Unix socket: several runs share the machine, each on its own TCP port.
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {directory / 'userlist.txt'}",
                f"admin_users = {self.user}",
                "pool_mode = transaction",
                f"default_pool_size = {self.pool_size}",
                "min_pool_size = 0",
                "reserve_pool_size = 0",
                f"max_client_conn = {self.max_client_conn}",
                # A server connection terminated by a test is replaced at once, not after 15 s.
                "server_login_retry = 1",
                # Idle server connections go soon, so a run leaves nothing connected for long.
                "server_idle_timeout = 30",
                f"logfile = {directory / 'pgbouncer.log'}",
                f"pidfile = {directory / 'pgbouncer.pid'}",
                "",
            ]
        )

    def start(self) -> PgBouncer:
        program = binary()
        if program is None:
            raise RuntimeError("pgbouncer is not installed (Debian: apt-get install -y pgbouncer)")
        directory = Path(tempfile.mkdtemp(prefix="chatapp-pgbouncer-"))
        self.directory = directory
        (directory / "userlist.txt").write_text(f'"{self.user}" ""\n')
        config = directory / "pgbouncer.ini"
        config.write_text(self._config(directory))
        command = [program, "-d", str(config)]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root: it runs as postgres, which must be able to
            # write its log and pid file here.
            account = pwd.getpwnam("postgres")
            for path in (directory, *directory.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
            command[1:1] = ["-u", "postgres"]
        subprocess.run(command, check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.pid = int((directory / "pgbouncer.pid").read_text().strip())
                psycopg.connect(self.dsn(self.user), connect_timeout=2).close()
                break
            except (OSError, ValueError, psycopg.OperationalError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start:\n{self.log_text()}") from None
                time.sleep(0.05)
        _SERVERS[(self.host, self.port)] = self.server
        return self

    def dsn(self, database: str) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={database}"

    def admin(self, command: str) -> list[tuple]:
        """Run a command on PgBouncer's admin console (``SHOW POOLS``, ``RECONNECT db``...)."""
        # The console speaks only the simple query protocol: psql's.
        result = subprocess.run(
            ["psql", "-X", "-A", "-t", "-F", "\t", "-c", command, self.dsn("pgbouncer")],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return [tuple(line.split("\t")) for line in result.stdout.splitlines() if line]

    def log_text(self) -> str:
        log = self.directory / "pgbouncer.log" if self.directory else None
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    def stop(self) -> None:
        _SERVERS.pop((self.host, self.port), None)
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            with contextlib.suppress(ProcessLookupError):
                while time.monotonic() < deadline:
                    os.kill(self.pid, 0)
                    time.sleep(0.05)
            self.pid = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def pooler_setting():
    """``CHATAPP_DATABASE_POOLER=pgbouncer`` for every app, server and CLI started meanwhile."""
    before = os.environ.get("CHATAPP_DATABASE_POOLER")
    os.environ["CHATAPP_DATABASE_POOLER"] = "pgbouncer"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CHATAPP_DATABASE_POOLER", None)
        else:
            os.environ["CHATAPP_DATABASE_POOLER"] = before


def behind_pgbouncer() -> bool:
    """Whether the apps this run starts connect through PgBouncer."""
    return os.environ.get("CHATAPP_DATABASE_POOLER") == "pgbouncer"
