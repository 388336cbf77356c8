"""The README stays true: CI runs its test command, and its table lists every setting."""

import re
import runpy
import shlex
import stat
import subprocess
import sys
from pathlib import Path

from chatapp.config import Defaults, check_secret_key

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(cmd for cmd in fenced_commands() if "pytest" in cmd)
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci_script.splitlines()


def test_configuration_table_lists_every_setting():
    settings = [name for name in vars(Defaults) if name.isupper()]
    missing = [name for name in settings if f"`{name}`" not in README or f"`CHATAPP_{name}`" not in README]
    assert missing == []


def test_quick_start_writes_a_secret_key_only_its_owner_can_read(tmp_path):
    """The quick start's key step, run as written under umask 022: a 0600 file with a key
    the start-up check accepts."""
    quick_start = next(cmd for cmd in fenced_commands() if "gunicorn" in cmd and "init-db" in cmd)
    key_step = re.search(r"\{ \[ -f instance/config\.py \] .*?; \}", quick_start).group(0)
    (tmp_path / "instance").mkdir()
    script = key_step.replace(".venv/bin/python", shlex.quote(sys.executable))
    subprocess.run(["bash", "-c", f"umask 022 && {script}"], cwd=tmp_path, check=True, timeout=60)
    written = tmp_path / "instance" / "config.py"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    check_secret_key({"SECRET_KEY": runpy.run_path(str(written))["SECRET_KEY"]})
