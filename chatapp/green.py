"""What changes when the process runs under gevent (the gevent worker, gunicorn.conf.py).

Under gevent every request, stream and background loop of a worker is a greenlet on one
OS thread: a call that blocks in C without yielding to gevent's hub stops them all. The
standard library's sockets, locks, sleeps and threads are patched to yield; what is left
is CPU-heavy C code, which ``off_hub`` runs on gevent's pool of real threads instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def gevent_patched() -> bool:
    """Whether gevent has patched this process's standard library."""
    # Looked up, never imported: only a process that patched has gevent.monkey loaded.
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def off_hub(func: Callable[..., T], *args, **kwargs) -> T:
    """``func(*args, **kwargs)``, on a real thread under gevent so the hub keeps running.

    Only for C code that releases the GIL while it works (hashlib's scrypt and pbkdf2 do):
    a password hash takes a few hundred milliseconds, which would otherwise freeze every
    open stream of the worker for that long. Without gevent it runs here, as before.
    """
    if not gevent_patched():
        return func(*args, **kwargs)
    import gevent

    return gevent.get_hub().threadpool.apply(func, args, kwargs)
