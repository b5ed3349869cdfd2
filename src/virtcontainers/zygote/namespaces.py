"""Put a forked worker where its client runs: the client's cgroup and its mount, network,
UTS, IPC and cgroup namespaces (containerd, for one, may run in a network namespace of its
own). A client in another pid or user namespace is refused: a worker cannot enter those as
the client sees them (a pid namespace applies to children only; a user namespace changes
what the worker's privileges mean)."""

from __future__ import annotations

import ctypes
import os

JOINED = ("cgroup", "ipc", "uts", "net", "mnt")
"""Entered in this order: the mount namespace last, as it changes what /proc and /sys are."""
REFUSED = ("pid", "user")
CGROUP_ROOT = "/sys/fs/cgroup"


class Refused(Exception):
    """The client cannot be served here; the text says why (the client runs the command)."""


def _ns(pid: int | str, name: str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/{name}")
    return st.st_dev, st.st_ino


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12
    if setns is not None:
        setns(fd, 0)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def cgroup_of(pid: int | str) -> str | None:
    """The cgroup v2 path of `pid` (None without a unified hierarchy line)."""
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].rstrip("\n")
    return None


def join(pid: int) -> list[str]:
    """Move this (single-threaded) process into `pid`'s cgroup and namespaces; returns what
    it joined. `Refused` when it cannot."""
    try:
        for name in REFUSED:
            if _ns(pid, name) != _ns("self", name):
                raise Refused(f"client pid {pid} is in another {name} namespace")
        joined = []
        theirs = cgroup_of(pid)
        if theirs is not None and theirs != cgroup_of("self"):
            with open(f"{CGROUP_ROOT}{theirs}/cgroup.procs", "w", encoding="ascii") as f:
                f.write(str(os.getpid()))
            joined.append(f"cgroup {theirs}")
        for name in JOINED:
            if _ns(pid, name) != _ns("self", name):
                fd = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
                joined.append(f"{name} namespace")
    except OSError as exc:
        raise Refused(f"cannot join client pid {pid}: {exc}") from exc
    return joined
