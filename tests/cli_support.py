"""Run `virtc` in this process, as the entry point does, and capture what it prints."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from virtcontainers.cli import run


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> CliResult:
    """`virtc ARGS...`: its exit code, stdout and stderr."""
    capsys.readouterr()  # drop what came before
    code = run(list(args))
    out, err = capsys.readouterr()
    return CliResult(code, out, err)
