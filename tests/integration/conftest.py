"""Integration-test fixtures: a leak check for real-VM tests.

`leak_check` gives a test a private run root and, after it, fails the test if any
qemu-system / virtiofsd / qemu-storage-daemon process naming that run root is still alive,
if anything is left under the run root's `vm/` directory (sockets, VM directories), or if
the test process holds more open fds than before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest

VMM_NAMES = ("qemu-system", "virtiofsd", "qemu-storage-daemon")


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def vmm_processes(marker: str) -> list[tuple[int, str]]:
    """Live (non-zombie) VMM processes whose command line mentions `marker`."""
    found: list[tuple[int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z" or marker not in cmdline:
            continue
        if any(name in cmdline.split(" ", 1)[0] for name in VMM_NAMES):
            found.append((int(entry), cmdline[:200]))
    return found


def leftovers(root: str) -> list[str]:
    out: list[str] = []
    vm_root = os.path.join(root, "vm")
    for dirpath, dirnames, filenames in os.walk(vm_root):
        out += [os.path.join(dirpath, d) for d in dirnames]
        out += [os.path.join(dirpath, f) for f in filenames]
    return out


@pytest.fixture
async def leak_check(run_root: str) -> AsyncIterator[str]:
    """The test's run root; checks for leaked processes, files and fds afterwards."""
    before = open_fds()
    yield run_root
    # Let closed transports finish closing before counting fds.
    await asyncio.sleep(0)
    procs = []
    for _ in range(50):
        procs = vmm_processes(run_root)
        if not procs:
            break
        await asyncio.sleep(0.1)
    files = leftovers(run_root)
    extra = open_fds() - before
    for pid, _ in procs:  # do not let one failure leak into the next test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    problems = []
    if procs:
        problems.append(f"VMM processes left running: {procs}")
    if files:
        problems.append(f"files left under {run_root}/vm: {files}")
    if extra:
        targets = {}
        for fd in extra:
            try:
                targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                targets[fd] = "?"
        problems.append(f"fds left open: {targets}")
    assert not problems, "; ".join(problems)
