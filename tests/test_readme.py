"""The README documents every setting, command and benchmark the code has."""

from __future__ import annotations

import pathlib
import re

import msgspec

from trio_kv.cli import build_parser
from trio_kv.server.config import ServerConfig

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    documented = set(re.findall(r"^\| `([a-z0-9_]+)`", README, flags=re.MULTILINE))
    documented |= set(re.findall(r"^\| `[a-z0-9_]+` / `([a-z0-9_]+)`", README, flags=re.MULTILINE))
    missing = [f.name for f in msgspec.structs.fields(ServerConfig) if f.name not in documented]
    assert missing == []


def test_every_serve_flag_is_documented():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = [opt for action in serve._actions for opt in action.option_strings if opt.startswith("--")]
    missing = [flag for flag in flags if flag not in README and flag != "--help"]
    assert missing == []


def test_every_benchmark_has_a_readme_entry():
    for name in ("cpu", "fs", "s3", "gpu", "soak"):
        assert f"trio-kv bench {name}" in README, name
