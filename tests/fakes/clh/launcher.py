"""Executable stand-ins for VMM binaries: small scripts that run a fake as `python -m ...`."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def write_launcher(
    path: str | os.PathLike[str],
    module: str,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> str:
    """Write an executable at `path` that execs `python -m module <its args> <extra_args>`.

    The interpreter is this test run's (it has jsonschema and PyYAML); `exec` keeps the pid,
    so the driver sees the fake's pid as the VMM's.
    """
    lines = ["#!/bin/sh"]
    for key, value in (env or {}).items():
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(str(REPO_ROOT))}")
    tail = " ".join(shlex.quote(a) for a in extra_args)
    lines.append(f'exec {shlex.quote(sys.executable)} -m {module} "$@" {tail}'.rstrip())
    text = "\n".join(lines) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return str(path)
