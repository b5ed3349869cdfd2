"""Host daemons that serve one VM: its vhost-user devices (virtiofsd, qemu-storage-daemon)
and its console log keeper (QEMU); virtiofsd (Cloud Hypervisor).

Each helper is keyed by what it serves, is started before the VMM connects to it and stopped
after the VMM let go of it (device removed or VM stopped). Helpers are persisted by
pid + start time so another process can stop them; signals go through a pidfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import LaunchError, VMTimeoutError
from .vmm_process import VmmProcess

log = logging.getLogger(__name__)

TERM_TIMEOUT = 3.0
KILL_TIMEOUT = 5.0
POLL_INTERVAL = 0.02


@dataclass
class Helper:
    """One running helper daemon."""

    kind: str  # "virtiofsd", "qemu-storage-daemon" or "console-log"
    key: str  # the device it serves, e.g. "fs-share0"
    socket: str
    log_path: str
    pid: int = 0
    start_time: int | None = None
    #: Files to remove once the daemon is gone (its socket, pid files it leaves behind).
    leftovers: list[str] = field(default_factory=list)
    proc: VmmProcess | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "socket": self.socket,
            "log_path": self.log_path,
            "pid": self.pid,
            "start_time": self.start_time,
            "leftovers": list(self.leftovers),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Helper:
        return cls(
            kind=str(d["kind"]),
            key=str(d["key"]),
            socket=str(d.get("socket", "")),
            log_path=str(d.get("log_path", "")),
            pid=int(d.get("pid", 0)),
            start_time=d.get("start_time"),
            leftovers=[str(p) for p in d.get("leftovers", [])],
        )


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


SO_ACCEPTCON = 0x10000
"""/proc/net/unix's flag of a listening socket."""


def is_listening(path: str) -> bool:
    """Whether the Unix socket at `path` listens: a daemon binds (the file appears) before
    it listens, and a connect in between is refused. /proc/net/unix lists this network
    namespace's sockets; one bound elsewhere (not listed) counts once its file exists."""
    if not is_socket(path):
        return False
    try:
        with open("/proc/net/unix") as f:
            listed = [line.split() for line in f if line.rstrip().endswith(" " + path)]
    except OSError:
        return True
    rows = [r for r in listed if len(r) == 8 and r[7] == path]
    return not rows or any(int(r[3], 16) & SO_ACCEPTCON for r in rows)


class Helpers:
    """The helper daemons of one VM."""

    def __init__(self, hypervisor: str = "qemu") -> None:
        self.hypervisor = hypervisor
        self._helpers: dict[str, Helper] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._helpers

    def __iter__(self) -> Iterator[Helper]:
        return iter(list(self._helpers.values()))

    def get(self, key: str) -> Helper | None:
        return self._helpers.get(key)

    def dead(self) -> list[Helper]:
        """The helpers started here whose process has exited."""
        return [h for h in self._helpers.values() if h.proc is not None and not h.proc.alive()]

    def pids(self, kind: str | None = None) -> list[int]:
        """Pids of the helpers still believed running (all kinds, or one)."""
        return [h.pid for h in self._helpers.values() if h.pid and kind in (None, h.kind)]

    async def start(
        self,
        kind: str,
        key: str,
        argv: Sequence[str],
        *,
        socket: str,
        log_path: str,
        timeout: float,
        leftovers: Sequence[str] = (),
        ready: Callable[[], bool] | None = None,
        stdin: int | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Helper:
        """Launch a daemon (keeping `pass_fds`) and wait until `socket` is a listening Unix
        socket (no socket: until `ready()`, or not at all).

        A daemon that exits first raises `LaunchError` with its log tail; one that does not
        listen within `timeout` is killed and raises `VMTimeoutError`. Nothing is left behind
        on failure.
        """
        if key in self._helpers:
            raise LaunchError(f"{self.hypervisor}: a {kind} for {key} is already running")
        if socket and not pass_fds:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket)  # a stale socket would look ready at once
        proc = await VmmProcess.spawn(kind, argv, log_path, stdin=stdin, pass_fds=pass_fds)
        helper = Helper(
            kind=kind,
            key=key,
            socket=socket,
            log_path=log_path,
            pid=proc.pid,
            start_time=proc.start_time,
            leftovers=[socket, *leftovers] if socket else list(leftovers),
            proc=proc,
        )
        check = ready or (lambda: not socket or is_listening(socket))
        deadline = time.monotonic() + timeout
        try:
            while not check():
                if not proc.alive():
                    raise LaunchError(
                        f"{self.hypervisor}: {kind} for {key} exited during start-up",
                        exit_code=proc.exit_code,
                        argv=proc.argv,
                        log_tail=proc.log_tail(),
                    )
                if time.monotonic() >= deadline:
                    raise VMTimeoutError(
                        f"{self.hypervisor}: {kind} for {key} did not listen on {socket} "
                        f"within {timeout:g}s"
                    )
                await asyncio.sleep(POLL_INTERVAL)
        except BaseException:
            await _stop(helper)
            raise
        self._helpers[key] = helper
        log.debug("%s for %s started (pid %d)", kind, key, proc.pid)
        return helper

    async def stop(self, key: str, grace: float = 0.0) -> None:
        """Stop the helper for `key` (waiting `grace` seconds for it to exit on its own)."""
        helper = self._helpers.pop(key, None)
        if helper is not None:
            await _stop(helper, grace)

    async def stop_all(self, grace: float = 0.0) -> None:
        """Stop every helper; used when the VM is gone."""
        for key in list(self._helpers):
            await self.stop(key, grace)

    def save(self) -> list[dict[str, Any]]:
        return [h.to_dict() for h in self._helpers.values()]

    def load(self, items: Sequence[dict[str, Any]]) -> None:
        """Restore persisted helpers; they are adopted (by pid and start time) when stopped."""
        self._helpers = {}
        for d in items:
            helper = Helper.from_dict(d)
            self._helpers[helper.key] = helper


async def _stop(helper: Helper, grace: float = 0.0) -> None:
    proc = helper.proc
    if proc is None and helper.pid:
        proc = VmmProcess.attach(helper.kind, helper.pid, helper.start_time, [helper.log_path])
    if proc is not None:
        try:
            if grace <= 0 or not await proc.wait(grace):
                await proc.stop(signal.SIGTERM, TERM_TIMEOUT, KILL_TIMEOUT)
        finally:
            proc.close()
    helper.proc = None
    helper.pid = 0
    for path in helper.leftovers:
        with contextlib.suppress(FileNotFoundError, PermissionError, IsADirectoryError):
            os.unlink(path)
