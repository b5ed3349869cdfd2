"""Leak checks for tests that run VMM processes (fake or real): processes, files, fds.

`LeakCheck(root)` is taken before a test; `await check.verify()` afterwards fails when a
process still mentions `root` on its command line, when this process has any child left
(zombies included: someone forgot to reap), when anything is left under `root` (empty shared parents
such as `vm/` aside), or when fds opened during the test are still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterable


def open_fds() -> dict[int, str]:
    """This process's fds and their targets."""
    out: dict[int, str] = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return rest[0].decode(), int(rest[1])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def processes_mentioning(marker: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes other than this one whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        st = _stat(int(entry))
        cmd = _cmdline(int(entry))
        if st and st[0] not in ("Z", "X") and marker in cmd:
            found.append((int(entry), cmd[:300]))
    return found


def children() -> list[tuple[int, str, str]]:
    """(pid, state, command) of every child of this process, zombies included."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st and st[1] == me:
            out.append((int(entry), st[0], _cmdline(int(entry))[:200]))
    return out


#: Host-wide caches a run root may hold between tests (the KVM probe's verdict).
HOST_CACHES = ("kvm-probe.json",)


def files_under(root: str, parents: Iterable[str] = ("vm",)) -> list[str]:
    """Everything below `root`; the shared parent directories named in `parents` (such as
    `vm/`, the parent of every VM directory) may stay as long as they are empty."""
    keep = set(parents)
    out: list[str] = []
    if not os.path.isdir(root):
        return out
    for name in os.listdir(root):
        if name in HOST_CACHES:
            continue
        path = os.path.join(root, name)
        if name not in keep or not os.path.isdir(path):
            out.append(path)
        for dirpath, dirnames, filenames in os.walk(path):
            out += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return out


class LeakCheck:
    """Snapshot before a test; `verify()` after it."""

    def __init__(self, root: str, parents: Iterable[str] = ("vm",)) -> None:
        self.root = root
        self.parents = list(parents)
        self.fds = open_fds()

    async def verify(self, settle: float = 3.0) -> None:
        """Assert nothing leaked (waiting up to `settle` s for exiting processes); clean up."""
        await asyncio.sleep(0)
        procs: list[tuple[int, str]] = []
        kids: list[tuple[int, str, str]] = []
        for _ in range(int(settle / 0.05)):
            procs = processes_mentioning(self.root)
            kids = children()
            if not procs and not kids:
                break
            await asyncio.sleep(0.05)
        files = files_under(self.root, self.parents)
        extra = {fd: t for fd, t in open_fds().items() if self.fds.get(fd) != t}
        for pid, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid, _state, _cmd in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        problems = []
        if procs:
            problems.append(f"processes left running: {procs}")
        if kids:
            problems.append(f"child processes left (unreaped or running): {kids}")
        if files:
            problems.append(f"files left under {self.root}: {files}")
        if extra:
            problems.append(f"fds left open: {extra}")
        assert not problems, "; ".join(problems)
