"""Process hygiene for a benchmark script: everything started is stopped, and everything
created is removed, when the script ends, even on Ctrl-C or SIGTERM."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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
    raise SystemExit(128 + signum)  # so that atexit runs


signal.signal(signal.SIGTERM, _terminate)


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    """A temporary directory for the run's SQLite files and server logs."""
    path = Path(tempfile.mkdtemp(prefix="chatapp-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"# logs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
