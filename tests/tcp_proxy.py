"""A TCP proxy between the app and PostgreSQL that a test controls, to fake an outage.

The shared PostgreSQL server is never stopped: the app connects to this proxy, and
the test decides what a new connection meets (``pass`` through, ``refuse``: reset at
once, ``blackhole``: accepted and never answered) and can ``cut`` every open one.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

MODES = ("pass", "refuse", "blackhole")


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a host whose server died would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close(sock)


def _close(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on this socket; close() alone does not.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # lets the accept loop notice stop()
        self.port = self._listener.getsockname()[1]
        self._mode = "pass"
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._held: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self.accepted = 0

    # --- control -------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        with self._lock:
            self._mode = mode
            held, self._held = self._held, set()
        for sock in held:  # blackholed clients have given up by now
            _reset(sock)

    def cut(self) -> int:
        """Reset every open pass-through connection, both sides; returns how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, set()
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        return len(pairs)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # --- life -----------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopped.set()
        self.set_mode("refuse")
        self.cut()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- plumbing -------------------------------------------------------------------

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="tcp-proxy")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            self.accepted += 1
            mode = self._mode
            if mode == "refuse":
                _reset(client)
            elif mode == "blackhole":
                with self._lock:
                    self._held.add(client)
            else:
                self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        with self._lock:
            self._pairs.add(pair)
        self._spawn(self._pump, client, upstream, pair)
        self._spawn(self._pump, upstream, client, pair)

    def _pump(self, source: socket.socket, target: socket.socket, pair) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        # One side ended: end the other too (PostgreSQL never half-closes), gently,
        # so that what was already forwarded (a Terminate message) still arrives.
        with self._lock:
            mine = pair in self._pairs
            self._pairs.discard(pair)
        if mine:
            for sock in pair:
                _close(sock)
