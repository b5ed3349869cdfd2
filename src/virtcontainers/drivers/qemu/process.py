"""A VMM process: launch (no -daemonize, stderr to a log), wait, signal, reap, log tail.

Waiting uses a pidfd, so it works the same for our own child and for a process adopted from
persisted state, and signals go through the pidfd so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import subprocess
from collections.abc import Sequence

from ... import host
from ...errors import LaunchError
from ..vmm_process import read_end, wait_pidfd


def log_tail(path: str, max_lines: int = 20, max_bytes: int = 8192) -> str:
    """The last lines of a log file ("" when it is missing)."""
    data = read_end(path, max_bytes)
    return "\n".join(data.splitlines()[-max_lines:]) if data else ""


def _private(path: str, flags: int) -> int:
    """`open()` opener creating the file 0600."""
    return os.open(path, flags, 0o600)


class VMProcess:
    """One running (or exited) VMM process, ours or adopted."""

    def __init__(
        self,
        pid: int,
        start_time: int | None,
        pidfd: int,
        popen: subprocess.Popen[bytes] | None = None,
        argv: Sequence[str] = (),
        log_path: str = "",
    ) -> None:
        self.pid = pid
        self.start_time = start_time
        self.argv = list(argv)
        self.log_path = log_path
        self._pidfd: int | None = pidfd
        self._popen = popen
        self.returncode: int | None = None

    # -- creation ----------------------------------------------------------------------------
    @classmethod
    def launch(
        cls,
        argv: Sequence[str],
        *,
        log_path: str,
        pass_fds: Sequence[int] = (),
        cwd: str | None = None,
        netns: str | None = None,
        stdin: int | None = None,
    ) -> VMProcess:
        """Start `argv` in its own session, stdin from /dev/null (or the fd `stdin`),
        stdout+stderr to `log_path`."""
        cmd = list(argv)
        if netns:
            cmd = ["nsenter", f"--net={netns}", "--", *cmd]
        try:
            with open(log_path, "ab", buffering=0, opener=_private) as log:
                popen = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL if stdin is None else stdin,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=tuple(pass_fds),
                    cwd=cwd,
                    start_new_session=True,
                    umask=0o077,  # sockets and logs QEMU creates are private (0600)
                )
        except OSError as exc:
            raise LaunchError(f"cannot execute {cmd[0]}: {exc.strerror}", argv=cmd) from exc
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError:
            popen.kill()
            popen.wait()
            raise
        return cls(
            popen.pid,
            host.process_start_time(popen.pid),
            pidfd,
            popen=popen,
            argv=cmd,
            log_path=log_path,
        )

    @classmethod
    def adopt(cls, pid: int, start_time: int | None, log_path: str = "") -> VMProcess | None:
        """Take over a process from persisted state, or None if it is gone or the pid was reused."""
        if pid <= 0 or start_time is None or not host.pid_is(pid, start_time):
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        # The pid could have been reused between the check and the open: check again.
        if not host.pid_is(pid, start_time):
            os.close(pidfd)
            return None
        return cls(pid, start_time, pidfd, log_path=log_path)

    # -- state -------------------------------------------------------------------------------
    @property
    def is_child(self) -> bool:
        return self._popen is not None

    def alive(self) -> bool:
        """True until the process has exited (a zombie counts as exited)."""
        if self._pidfd is None:
            return False
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        if readable:
            self._reap()
            return False
        return True

    def log_tail(self, max_lines: int = 20) -> str:
        return log_tail(self.log_path, max_lines) if self.log_path else ""

    # -- waiting and signals -----------------------------------------------------------------
    async def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for exit; True when it has exited."""
        if not self.alive():
            return True
        assert self._pidfd is not None
        await wait_pidfd(self._pidfd, timeout)
        return not self.alive()

    def signal(self, sig: int) -> None:
        """Send `sig` through the pidfd (never to a recycled pid); a gone process is ignored."""
        if self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    async def terminate(self, term_timeout: float = 3.0, kill_timeout: float = 5.0) -> None:
        """SIGTERM, wait, then SIGKILL, wait; reaps our own child."""
        if await self.wait(0):
            return
        self.signal(signal.SIGTERM)
        if await self.wait(term_timeout):
            return
        self.signal(signal.SIGKILL)
        await self.wait(kill_timeout)

    def _reap(self) -> None:
        if self.returncode is not None:
            return
        if self._popen is not None:
            self.returncode = self._popen.wait()
            return
        # Adopted: reap it only if it happens to be our child (same process launched it).
        try:
            assert self._pidfd is not None
            res = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            res = None
        except OSError as exc:
            if exc.errno != errno.ECHILD:
                raise
            res = None
        if res is not None:
            self.returncode = res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
        else:
            self.returncode = -1

    def close(self) -> None:
        """Release the pidfd (the process itself is left alone)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
