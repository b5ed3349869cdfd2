"""Start and stop a zygote beside the VM cache server (`factory.daemon`): the server starts
it with a pipe whose write end only the server holds, so the zygote exits (and removes its
socket) when the server is gone, however the server died; `stop` ends it at shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess

from .. import host
from . import protocol

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0


class Zygote:
    """A running zygote child: its process and the pipe that keeps it alive."""

    def __init__(self, proc: subprocess.Popen[bytes], keep_alive: int, socket_path: str) -> None:
        self.proc = proc
        self.keep_alive = keep_alive
        self.socket_path = socket_path

    def stop(self) -> None:
        """Close its pipe (it exits), wait for it; SIGKILL if it does not, then remove its
        socket. Its workers run on: each belongs to a command whose client waits for it."""
        with contextlib.suppress(OSError):
            os.close(self.keep_alive)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("zygote %d did not exit; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


def enabled() -> bool:
    """False when $VIRTC_NO_ZYGOTE is set where the VM cache server starts."""
    return not os.environ.get(protocol.DISABLE_ENV)


def start(socket_path: str, log_path: str) -> Zygote:
    """Start a zygote serving on `socket_path`, its output appended to `log_path`; it serves
    once its imports are done (until then, commands run in their own process)."""
    read_end, write_end = os.pipe()  # both close-on-exec: only the zygote gets read_end
    try:
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                host.python_command(
                    "-u",
                    "-m",
                    "virtcontainers.zygote",
                    "--socket",
                    socket_path,
                    "--parent-fd",
                    str(read_end),
                ),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(read_end,),
            )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return Zygote(proc, write_end, socket_path)
