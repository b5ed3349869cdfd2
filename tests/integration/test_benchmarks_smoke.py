"""Smoke test of the benchmark suite: `run_all.py --quick` on a cheap subset, real VMs.

Checks the shape of what the suite writes (JSON keys, positive measurements, the report and
the plot) and that it leaves nothing behind; never the timings themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from leaks import processes_mentioning

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
RUN_ALL = ROOT / "benchmarks" / "run_all.py"


def positive_stats(stats: dict[str, Any], n: int) -> None:
    assert stats["n"] == n == len(stats["samples"])
    assert all(x > 0 for x in stats["samples"])
    for key in ("median", "mean", "p90", "p99", "min", "max"):
        assert stats[key] > 0, key
    assert stats["min"] <= stats["median"] <= stats["max"]


@pytest.fixture
def bench_tmp() -> Any:
    """A private directory for the benchmarks' run roots (checked empty afterwards)."""
    path = tempfile.mkdtemp(prefix="vcs-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_run_all_quick_subset(tmp_path: Path, bench_tmp: str) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, VC_BENCH_TMPDIR=bench_tmp)
    argv = [sys.executable, str(RUN_ALL), "--quick", "--runs", "1", "--warmup", "0"]
    argv += ["--only", "cold_boot,exec", "--out", str(out)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=850, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    data = json.loads((out / "latest.json").read_text())
    assert {"generated_at", "elapsed_s", "options", "machine", "benchmarks"} <= set(data)
    assert data["options"] == {"runs": 1, "warmup": 0, "quick": True}
    machine = data["machine"]
    assert machine["accelerator"] in ("kvm", "tcg") and machine["accelerator_reason"]
    assert machine["cpus"] > 0 and machine["memory_bytes"] > 0
    assert machine["qemu"].startswith("QEMU emulator version")
    assert set(data["benchmarks"]) == {"cold_boot", "exec"}

    boot = data["benchmarks"]["cold_boot"]
    assert "error" not in boot
    n = boot["metrics"]["virtcontainers"]["boot"]["n"]
    assert n >= boot["runs"] >= 1
    for cand in ("virtcontainers", "raw_qemu"):
        for metric in ("boot", "agent", "teardown", "launch"):
            positive_stats(boot["metrics"][cand][metric], n)
        # The agent answers after the ready marker, on the same clock.
        assert boot["metrics"][cand]["agent"]["median"] >= boot["metrics"][cand]["boot"]["median"]
    positive_stats(boot["metrics"]["virtcontainers"]["create"], n)
    if "libvirt" in boot["skipped"]:
        assert boot["skipped"]["libvirt"]
        assert "libvirt" not in boot["metrics"]
    else:
        positive_stats(boot["metrics"]["libvirt"]["boot"], n)
    labels = {c["label"]: c for c in boot["checks"]}
    vs_raw = labels["boot: virtcontainers / raw QEMU"]
    assert vs_raw["value"] > 0 and vs_raw["target"] == 1.05 and isinstance(vs_raw["met"], bool)
    assert vs_raw["paired"] > 0

    ex = data["benchmarks"]["exec"]
    assert "error" not in ex
    positive_stats(ex["metrics"]["exec_true"]["round_trip"], ex["round_trips_per_run"])
    positive_stats(ex["metrics"]["agent_ping"]["round_trip"], ex["round_trips_per_run"])
    for cand in ("virtc_run", "cold_boot", "sandbox_run", "virtc_version"):
        positive_stats(ex["metrics"][cand]["wall"], 1)
    limit = next(c for c in ex["checks"] if c["kind"] == "seconds")
    assert limit["target"] == 0.020 and limit["value"] > 0

    md = (out / "benchmarks.md").read_text()
    for heading in ("# Benchmarks", "## Machine", "## Targets and ratios", "Cold boot", "virtc"):
        assert heading in md
    assert machine["qemu"] in md
    assert "benchmarks-boot.png" in md
    assert (out / "benchmarks-boot.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # Nothing left behind: no VMM naming our directory, no run root left in it.
    assert processes_mentioning(bench_tmp) == []
    assert os.listdir(bench_tmp) == []
