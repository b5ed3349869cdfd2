"""Helpers for the reliability suite: QEMU sandbox settings, cleanliness checks, subprocesses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

from leaks import leftovers, vm_processes

BOOT_TIMEOUT = 60.0
MEMORY_MIB = 256


def sandbox_kw(guest_assets: Any, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for a small QEMU sandbox booting the project's guest assets."""
    kw: dict[str, Any] = {
        "kernel_path": guest_assets.kernel,
        "initrd_path": guest_assets.initrd,
        "memory_size": MEMORY_MIB,
        "num_vcpus": 1,
    }
    kw.update(overrides)
    return kw


def assert_clean(run_root: str) -> None:
    """Nothing of any sandbox is left: no VMM or helper process, VM file or state directory."""
    assert vm_processes(run_root) == []
    assert leftovers(run_root, "vm") == []
    assert leftovers(run_root, "sbs") == []


async def run_python(code: str, *args: str, timeout: float = 120.0) -> tuple[int, str, str]:
    """Run `code` in a fresh interpreter (another manager process); returns rc, out, err."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
