"""Processes known by pid and start time (a pid alone may be reused): the start time, whether
a pid is still that process, a pidfd on it, a signal through one. Standard library only:
the containerd shim's `start` and `delete`, run for every container, import this and nothing
heavier (`host` re-exports these names)."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing's: importing typing costs the shim's `delete`
if TYPE_CHECKING:
    import signal
else:
    import _signal as signal  # `signal` imports enum


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the comm field), or None if unreadable."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm is "(...)" and may itself contain spaces and ')': split after the LAST ')'.
    close = data.rfind(b")")
    if close < 0:
        return None
    return data[close + 1 :].decode("ascii", "replace").split()


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def pid_is(pid: int, start_time: int | None) -> bool:
    """True when `pid` is alive (not a zombie) and is the process that started at `start_time`.

    Guards every signal sent to a persisted pid: a reused pid has another start time.
    """
    if start_time is None:
        return False
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X", "x"):
        return False
    try:
        return int(fields[19]) == start_time
    except ValueError:
        return False


def pidfd_of(pid: int, start_time: int | None) -> int | None:
    """A pidfd on `pid` while it is the process that started at `start_time`, else None.

    The pidfd pins that process: a signal sent through it (`signal.pidfd_send_signal`) never
    reaches another process that got the number meanwhile. The caller closes it.
    """
    if pid <= 0 or not pid_is(pid, start_time):
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if not pid_is(pid, start_time):  # reused between the check and the open
        os.close(fd)
        return None
    return fd


def signal_process(pid: int, start_time: int | None, sig: int) -> bool:
    """Send `sig` to `pid` if it is still the process that started at `start_time` (through
    a pidfd, see `pidfd_of`); False when that process is gone."""
    fd = pidfd_of(pid, start_time)
    if fd is None:
        return False
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
    return True
