"""Leak detection shared by the real-VM suites (integration, reliability).

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


def fd_targets(fds: set[int]) -> dict[int, str]:
    """What each fd of this process points at ("?" when it closed meanwhile)."""
    targets = {}
    for fd in fds:
        try:
            targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            targets[fd] = "?"
    return targets


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


def leftovers(root: str, sub: str = "vm") -> list[str]:
    """Every file and directory left under `<root>/<sub>`."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
        out += [os.path.join(dirpath, d) for d in dirnames]
        out += [os.path.join(dirpath, f) for f in filenames]
    return out


async def wait_vmm_gone(marker: str, tries: int = 50) -> list[tuple[int, str]]:
    """VMM processes naming `marker` still alive after up to `tries` x 0.1 s."""
    procs: list[tuple[int, str]] = []
    for _ in range(tries):
        procs = vmm_processes(marker)
        if not procs:
            break
        await asyncio.sleep(0.1)
    return procs


def kill_all(procs: list[tuple[int, str]]) -> None:
    """SIGKILL leaked VMMs so one failure does not leak into the next test."""
    for pid, _ in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


@pytest.fixture
async def leak_check(run_root: str) -> AsyncIterator[str]:
    """The test's run root; checks for leaked processes, files and fds afterwards."""
    before = open_fds()
    yield run_root
    # Let closed transports finish closing before counting fds.
    await asyncio.sleep(0)
    procs = await wait_vmm_gone(run_root)
    files = leftovers(run_root)
    extra = open_fds() - before
    kill_all(procs)
    problems = []
    if procs:
        problems.append(f"VMM processes left running: {procs}")
    if files:
        problems.append(f"files left under {run_root}/vm: {files}")
    if extra:
        problems.append(f"fds left open: {fd_targets(extra)}")
    assert not problems, "; ".join(problems)
