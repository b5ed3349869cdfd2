"""Give a worker its client's command line (/proc/PID/cmdline, what ps, pgrep -f and the
tests' leak checks read) and name (/proc/PID/comm), instead of the zygote's, which it
inherits from the fork: a command looks like the command it is, a leaked one included.

The argument area is rewritten in place, as setproctitle(3) does (PR_SET_MM would need
CAP_SYS_RESOURCE): the words joined by spaces, overflowing into the environment area when
longer (the kernel then reads up to the first NUL). Call it only once os.environ has been
replaced: the C environment then no longer points into that area.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_NAME = 15


def _stat_fields() -> list[bytes]:
    """/proc/self/stat's fields from the third (state) on: field N is at index N - 3."""
    with open("/proc/self/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def set_title(argv: list[str]) -> None:
    """Show `argv` as this process's command line (cut to the space the kernel gave the
    zygote's arguments and environment) and name it after argv[0]."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, os.fsencode(os.path.basename(argv[0]))[:15], 0, 0, 0)
    fields = _stat_fields()
    arg_start, arg_end, env_start, env_end = (int(fields[i]) for i in (45, 46, 47, 48))
    room = (env_end if env_start == arg_end else arg_end) - arg_start - 1
    if room <= 0:
        return
    title = b" ".join(os.fsencode(a) for a in argv)[:room]
    data = title + b"\0" * max(1, arg_end - arg_start - len(title))
    ctypes.memmove(arg_start, data[: room + 1], min(len(data), room + 1))
