"""The package as a deployment gets it: a wheel, installed (not editable) into a new virtualenv
with the pinned dependencies, migrates a database and serves pages from outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support.databases import SECRET_KEY
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
# What a build reads; build output, caches and the test suite stay behind.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
    "tests",
    "bench",
    "instance",
)


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, by normalised name."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)(?:\[[^]]*\])?==(\S+)", line)
        if match:
            found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return found


def test_test_requirements_pin_the_runtime_as_requirements_txt_does():
    runtime, test = pins(ROOT / "requirements.txt"), pins(ROOT / "requirements-test.txt")
    assert runtime, "requirements.txt pins nothing"
    assert {name: test.get(name) for name in runtime} == runtime
    assert "redis" not in runtime, "redis is the [redis] extra's, not a runtime dependency"


def _run(args: list, *, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_wheel_installs_migrates_and_serves_outside_the_checkout(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CHATAPP_", "PYTHON", "PROMETHEUS_")) and key != "VIRTUAL_ENV"
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    # Build from a copy of the sources: an in-tree build/ left over from another build
    # would put files in the wheel that the sources no longer have.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", source],
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("chatapp-*.whl")

    # A new virtualenv with nothing but the wheel and the pinned versions of what it requires.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, env=env, timeout=120)
    python = venv / "bin" / "python"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-q",
            "--no-compile",
            wheel,
            "-c",
            ROOT / "requirements.txt",
        ],
        cwd=tmp_path,
        env=env,
        timeout=600,
    )

    # Run from a folder outside the checkout, as a deployment would.
    run = tmp_path / "run"
    run.mkdir()
    env |= {"CHATAPP_SECRET_KEY": SECRET_KEY, "CHATAPP_RATELIMIT_ENABLED": "false"}
    where = _run([python, "-c", "import chatapp; print(chatapp.__file__)"], cwd=run, env=env, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    # An installed package's instance folder is <prefix>/var/chatapp-instance (Flask's rule).
    _run([venv / "bin" / "flask", "--app", "chatapp", "init-db"], cwd=run, env=env, timeout=120)
    assert (venv / "var" / "chatapp-instance" / "chatapp.sqlite").is_file()

    shutil.copy(ROOT / "gunicorn.conf.py", run)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - gunicorn writes to it until it stops
    server = subprocess.Popen(
        [
            venv / "bin" / "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--threads",
            "4",
            "--no-control-socket",
            "chatapp:create_app()",
        ],
        cwd=run,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "gunicorn exited early"
            try:
                health = requests.get(f"{url}/healthz", timeout=5)
                break
            except requests.RequestException:  # not listening yet, or the worker is still booting
                assert time.monotonic() < deadline, "gunicorn did not start within 60 s"
                time.sleep(0.2)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200

        login = requests.get(f"{url}/login", timeout=10)
        assert login.status_code == 200
        assert 'name="password"' in login.text
        stylesheet = requests.get(f"{url}/static/app.css", timeout=10)
        assert stylesheet.status_code == 200 and len(stylesheet.content) > 0

        # The database init-db migrated is the one the server uses.
        created = requests.post(
            f"{url}/api/v1/users", timeout=30, json={"username": "wheel-user", "password": "correct horse battery"}
        )
        assert created.status_code == 201, created.text
    except BaseException:
        server.kill()
        server.wait(timeout=30)
        log.close()
        sys.stderr.write((tmp_path / "gunicorn.log").read_text(errors="replace")[-5000:])
        raise
    server.terminate()
    assert server.wait(timeout=60) == 0
    log.close()

    # All of that without redis, which only the [redis] extra brings.
    no_redis = _run(
        [python, "-c", "import importlib.util; print(importlib.util.find_spec('redis') is None)"],
        cwd=run,
        env=env,
        timeout=60,
    )
    assert no_redis.stdout.strip() == "True", "redis is installed without the [redis] extra"
