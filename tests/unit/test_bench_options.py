"""The benchmarks' shared options: `--only` picks candidates, and an unknown one is refused
by name (benchmarks/_lib.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _lib import chosen, parse_options

KNOWN = ("virtc_run", "virtc_run_none", "virtc_run_image", "cp")


def test_only_picks_the_candidates_named() -> None:
    opts, _ = parse_options("t", ["--runs", "3", "--only", "virtc_run,virtc_run_image"])
    assert opts.only == ("virtc_run", "virtc_run_image") and opts.runs == 3
    assert chosen(opts, KNOWN, "virtc_run")
    assert chosen(opts, KNOWN, "cp", "virtc_run_image")
    assert not chosen(opts, KNOWN, "cp")
    every, _ = parse_options("t", [])
    assert every.only == () and chosen(every, KNOWN, "cp")


def test_only_refuses_an_unknown_candidate(capsys: pytest.CaptureFixture[str]) -> None:
    opts, _ = parse_options("t", ["--only", "virtc_run,virtc_rn"])
    with pytest.raises(SystemExit):
        chosen(opts, KNOWN, "virtc_run")
    assert "no candidate virtc_rn" in capsys.readouterr().err
