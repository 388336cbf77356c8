"""The README stays true: CI runs its test command, and its table lists every setting."""

import re
from pathlib import Path

from chatapp.config import Defaults

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
