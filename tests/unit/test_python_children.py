"""Python child processes never import code from the directory they were started in.

Root runs `virtc check` or starts the VM cache from wherever the operator stands; a user who
planted `virtcontainers/__init__.py` there must not get it run (as root) by a child
interpreter that puts its working directory first on `sys.path`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from virtcontainers import kvm_probe
from virtcontainers.drivers import vmm_process
from virtcontainers.factory import daemon, paths


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding a hostile `virtcontainers` package; returns its marker path."""
    marker = tmp_path / "imported"
    pkg = tmp_path / "cwd" / "virtcontainers"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (pkg / "factory").mkdir()
    (pkg / "factory" / "__init__.py").write_text("")
    (pkg / "factory" / "__main__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(pkg.parent)
    return marker


def test_kvm_probe_child_ignores_the_working_directory(planted: Path) -> None:
    result = kvm_probe.kvm_probe("/dev/null")
    assert not planted.exists(), "the probe child imported the planted package"
    # The real probe ran (and found that /dev/null is no KVM).
    assert result.reason.startswith("KVM_GET_API_VERSION"), result.reason


def test_factory_daemon_ignores_the_working_directory(planted: Path, run_root: str) -> None:
    os.makedirs(paths.factory_dir(run_root))
    proc = daemon._spawn(run_root)  # no spec file: the real daemon exits at once
    try:
        code = proc.wait(60)
    finally:
        daemon._children.pop(proc.pid, None)
    assert not planted.exists(), "the daemon imported the planted package"
    assert code == daemon.EXIT_BAD_SPEC
    with open(paths.log_file(run_root), encoding="utf-8") as f:
        assert "cannot read the factory spec" in f.read()


def test_console_keeper_runs_isolated_without_site() -> None:
    argv = vmm_process.console_keeper_command("/x", 1)
    assert argv[:3] == [sys.executable, "-I", "-S"], argv
