"""Several "hosts" on this machine: one network namespace each, behind a real load balancer.

As root, each host is a network namespace (``ip netns``) with its own loopback and one veth
whose other end sits on a bridge in the root namespace. The bridge holds the gateway
address (10.a.b.1/24, a /24 no interface here uses yet), where the shared services listen
(PostgreSQL through a PgBouncer, Redis, the model, HAProxy); host n is 10.a.b.(n+2).
Names carry this process's id and a counter, so parallel runs never clash, and a run killed
before its clean-up leaves namespaces that the next run deletes (their process is gone).

Without root (or without ``ip netns``) the hosts are distinct loopback addresses
(127.0.0.2, 127.0.0.3...) and the gateway is 127.0.0.1: no isolation, but the same test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.support.servers import free_port, terminate

_NAMESPACE = re.compile(r"^chatapp-(\d+)x(\d+)-h\d+")
_runs = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def namespaces_possible() -> str | None:
    """None when ``ip netns`` can be used here; else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    probe = f"chatapp-{os.getpid()}x999-probe"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as error:
        return f"ip netns add failed: {error.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> None:
    """Delete namespaces and bridges left by runs whose process is gone."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        match = _NAMESPACE.match(line.strip())
        if match and not _pid_alive(int(match.group(1))):
            _ip("netns", "del", line.split()[0], check=False)
            _ip("link", "del", f"cb{match.group(1)}x{match.group(2)}", check=False)


def _free_subnet() -> str:
    """``10.a.b`` of a /24 that no address of this machine is in."""
    used = _ip("-o", "-4", "addr", "show").stdout + _ip("-4", "route", "show").stdout
    for _ in range(200):
        prefix = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 for the test hosts")


class Host:
    """One host: an address, and a command prefix that runs a program there."""

    def __init__(self, name: str, address: str, namespace: str | None):
        self.name = name
        self.address = address
        self.namespace = namespace

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args] if self.namespace else args

    def free_port(self) -> int:
        # A port free on this machine's loopback; in a namespace every port is free anyway.
        return free_port()


class Topology:
    """``count`` hosts and the gateway address the shared services bind to."""

    def __init__(self, count: int, *, namespaces: bool | None = None):
        self.count = count
        why_not = namespaces_possible() if namespaces is not False else "asked for loopback addresses"
        self.isolated = why_not is None
        self.why_not_isolated = why_not
        self.tag = f"{os.getpid()}x{next(_runs)}"
        self.bridge = f"cb{self.tag}"
        self.hosts: list[Host] = []
        self.gateway = "127.0.0.1"

    def start(self) -> Topology:
        if not self.isolated:
            self.hosts = [Host(f"h{n}", f"127.0.0.{n + 2}", None) for n in range(self.count)]
            return self
        remove_stale_namespaces()
        prefix = _free_subnet()
        self.gateway = f"{prefix}.1"
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for n in range(self.count):
                namespace = f"chatapp-{self.tag}-h{n}"
                veth = f"cv{self.tag}h{n}"
                _ip("netns", "add", namespace)
                self.hosts.append(Host(f"h{n}", f"{prefix}.{n + 2}", namespace))
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", namespace, "addr", "add", f"{prefix}.{n + 2}/24", "dev", "eth0")
                _ip("-n", namespace, "link", "set", "eth0", "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as error:
            # Namespaces but no bridge or veth here (a restricted container): loopback addresses.
            self.stop()
            self.isolated = False
            self.why_not_isolated = f"{' '.join(error.cmd)} failed: {error.stderr.strip()}"
            self.gateway = "127.0.0.1"
            return self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def describe(self) -> str:
        if self.isolated:
            return f"network namespaces on bridge {self.bridge} ({self.gateway}/24)"
        return f"loopback addresses ({self.why_not_isolated})"

    def stop(self) -> None:
        """Delete the namespaces (their veths go with them) and the bridge; stop the hosts' processes first."""
        for host in self.hosts:
            if host.namespace:
                _ip("netns", "del", host.namespace, check=False)
        if self.isolated:
            _ip("link", "del", self.bridge, check=False)
        self.hosts = []

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


HAPROXY_CONFIG = """\
global
    maxconn 4000

defaults
    mode http
    timeout connect 2s
    timeout http-request 10s
    # A stream is quiet between keep-alives (15 s): the idle timeouts must be longer.
    timeout client 120s
    timeout server 120s
    timeout tunnel 120s
    # Each request is balanced on its own (the client's keep-alive connection to HAProxy
    # stays open), so round-robin alternates even for one client.
    option http-server-close
    # The client's address for the app's rate limits (with CHATAPP_PROXY_FIX_X_FOR=1).
    option forwardfor
    # Send each event on at once: without it HAProxy marks the data of a response not yet
    # ended as "more to come" (MSG_MORE), and the kernel holds a small SSE event up to
    # 200 ms waiting for more.
    option http-no-delay
    # A request whose connection to a server failed, or that a server closed without an
    # answer (a host restarting), is sent again to another. Safe for a post too: a client
    # sending an Idempotency-Key gets the first answer again, never a second message.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend chat
    bind {address}:{port}
    default_backend apps

backend apps
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    # Which host answered, for the client to record.
    http-response set-header X-Served-By %[srv_name]
{servers}
"""


class HAProxy:
    """Debian's ``haproxy`` in the foreground, round-robin over ``servers`` (name -> address:port)."""

    def __init__(self, address: str, servers: dict[str, str], log_dir: Path):
        self.address = address
        self.port = free_port()
        self.url = f"http://{address}:{self.port}"
        self.servers = servers
        self.config_path = log_dir / "haproxy.cfg"
        self.log_path = log_dir / "haproxy.log"
        self.process: subprocess.Popen | None = None

    def config(self) -> str:
        servers = "\n".join(
            # Checked every 0.5 s: a host going down leaves the rotation within a second.
            f"    server {name} {target} check inter 500 fall 2 rise 2"
            for name, target in self.servers.items()
        )
        return HAPROXY_CONFIG.format(address=self.address, port=self.port, servers=servers)

    def start(self) -> HAProxy:
        self.config_path.write_text(self.config())
        program = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - haproxy writes to it until stop()
        self.process = subprocess.Popen(
            [program, "-db", "-f", str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 15
        import requests

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.log_path.read_text(errors='replace')}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"haproxy did not answer:\n{self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        terminate(self.process, 10)
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
