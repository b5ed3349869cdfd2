"""The console log kept within a size cap, whatever the guest writes to its console.

QEMU's own `logfile=` grows without bound, so a guest flooding its serial port could fill
the host's disk. Instead QEMU writes the log into a pipe (`logfile=/dev/fdset/N`) read by
a keeper process (`..console_keeper`) that rotates it at the cap. The keeper exits when
QEMU closes the pipe; if it dies first, QEMU's writes fail and are dropped: the VM never
waits for it.
"""

from __future__ import annotations

import os

from .. import console_keeper
from .helpers import Helpers

KIND = "console-log"


async def start(helpers: Helpers, path: str, max_bytes: int, log_path: str) -> int:
    """Start the keeper of `path`; returns the pipe's write end, for QEMU (the caller
    closes it once QEMU holds its copy)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        await helpers.start(
            KIND,
            KIND,
            console_keeper.command(path, max_bytes),
            socket="",
            log_path=log_path,
            timeout=0,
            stdin=read_end,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return write_end
