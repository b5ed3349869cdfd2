"""The machine the benchmarks ran on: CPU, memory, kernel, QEMU, accelerator (and why)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from typing import Any

from virtcontainers import __version__, host, kvm_probe


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _git_commit() -> str:
    """The commit measured: `$VC_BENCH_GIT_COMMIT` (a run from an exported snapshot), else
    this checkout's HEAD, flagged when the working tree has uncommitted changes."""
    if os.environ.get("VC_BENCH_GIT_COMMIT"):
        return os.environ["VC_BENCH_GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    commit = _first_line(["git", "-C", here, "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"])
    return f"{commit}{' (working tree has uncommitted changes)' if dirty else ''}"


def machine_info() -> dict[str, Any]:
    """Facts about this host that the numbers depend on."""
    probe = kvm_probe.cached_kvm_probe()
    qemu = shutil.which("qemu-system-x86_64") or ""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count() or 0,
        "memory_bytes": host.host_memory_kib() * 1024,
        "os": _os_name(),
        "kernel": platform.release(),
        "qemu": _first_line([qemu, "--version"]) if qemu else "not found",
        "accelerator": "kvm" if probe.usable else "tcg",
        "accelerator_reason": probe.reason,
        "kvm_device": os.path.exists("/dev/kvm"),
        "running_on_vmm": host.running_on_vmm(),
        "python": sys.version.split()[0],
        "virtcontainers": __version__,
        "git_commit": _git_commit(),
        "load_average": list(os.getloadavg()),
    }
