"""Leak detection shared by every suite that runs VMM processes (real or fake).

`LeakCheck(root)` is taken before a test; `await check.verify()` afterwards fails when a
process still mentions `root` on its command line, when this process has any child left,
when anything is left under `root`, or when fds opened during the test are still open.

`leak_check` gives a test a private run root and, after it, fails the test if any
qemu-system / virtiofsd / qemu-storage-daemon process naming that run root is still alive,
if anything is left under the run root's `vm/` directory (sockets, VM directories), or if
the test process holds more open fds than before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterable

import pytest

VMM_NAMES = ("qemu-system", "virtiofsd", "qemu-storage-daemon")
#: Helper scripts run by an interpreter (the program is python: matched by script name).
HELPER_SCRIPTS = ("console_keeper.py",)


def open_fds() -> set[int]:
    """This process's open fds; the one listing /proc/self/fd is closed by then and left out
    (counted, it shifts with the lowest free number and looks like a leak)."""
    return {int(fd) for fd in os.listdir("/proc/self/fd") if _is_open(fd)}


def _is_open(fd: str) -> bool:
    try:
        os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return True


async def new_fds(before: set[int]) -> set[int]:
    """The fds opened since `before` that stay open for a second: library threads (gRPC's
    poller, a channel left by an earlier test reconnecting) open and close their own meanwhile."""
    extra = open_fds() - before
    for _ in range(20):
        if not extra:
            break
        await asyncio.sleep(0.05)
        extra = open_fds() - before
    return extra


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
    return [
        (pid, cmd)
        for pid, cmd in processes_mentioning(marker)
        if any(name in cmd.split(" ", 1)[0] for name in VMM_NAMES)
    ]


def vm_processes(marker: str) -> list[tuple[int, str]]:
    """`vmm_processes` and the helper scripts a VM runs (its console log keeper)."""
    return [
        (pid, cmd)
        for pid, cmd in processes_mentioning(marker)
        if any(name in cmd.split(" ", 1)[0] for name in VMM_NAMES)
        or any(script in cmd for script in HELPER_SCRIPTS)
    ]


def leftovers(root: str, sub: str = "vm") -> list[str]:
    """Every file and directory left under `<root>/<sub>`."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
        out += [os.path.join(dirpath, d) for d in dirnames]
        out += [os.path.join(dirpath, f) for f in filenames]
    return out


async def wait_vmm_gone(marker: str, tries: int = 50) -> list[tuple[int, str]]:
    """VMM processes (and helpers) naming `marker` still alive after up to `tries` x 0.1 s."""
    procs: list[tuple[int, str]] = []
    for _ in range(tries):
        procs = vm_processes(marker)
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
    """The test's run root; checks for leaked processes, zombies, files and fds afterwards."""
    before = open_fds()
    kids_before = {pid for pid, _, _ in children()}
    yield run_root
    # Let closed transports finish closing before counting fds.
    await asyncio.sleep(0)
    procs = await wait_vmm_gone(run_root)
    files = leftovers(run_root)
    extra = await new_fds(before)
    kill_all(procs)
    zombies = [k for k in children() if k[1] == "Z" and k[0] not in kids_before]
    problems = []
    if zombies:
        problems.append(f"child processes left unreaped: {zombies}")
    if procs:
        problems.append(f"VMM processes left running: {procs}")
    if files:
        problems.append(f"files left under {run_root}/vm: {files}")
    if extra:
        problems.append(f"fds left open: {fd_targets(extra)}")
    assert not problems, "; ".join(problems)


# -- generic leak check for any VMM process (fake or real) ---------------------------------


def open_fd_targets() -> dict[int, str]:
    """This process's fds and their targets."""
    out: dict[int, str] = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    """State letter and parent pid of `pid`, or None once it is gone.

    Any OSError means gone: a task being reaped answers ESRCH (ProcessLookupError) rather
    than ENOENT for a moment.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return rest[0].decode(), int(rest[1])


def proc_status(pid: int) -> str:
    """The one-letter state of `pid` from /proc ("" once it is gone)."""
    st = _stat(pid)
    return st[0] if st else ""


def running(pid: int) -> bool:
    """`pid` still runs: neither gone nor a zombie waiting to be reaped."""
    return proc_status(pid) not in ("", "Z", "X")


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
        self.fds = open_fd_targets()

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
        extra = {fd: t for fd, t in open_fd_targets().items() if self.fds.get(fd) != t}
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
