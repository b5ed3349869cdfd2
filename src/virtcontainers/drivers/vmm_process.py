"""VMM and helper host processes: spawn, watch, signal (through pidfds), reap, read their
log tails, and kill the strays no driver knew about.

`VmmProcess` is the one process handle of every driver (QEMU and its helpers, Firecracker,
Cloud Hypervisor, ACRN, virtiofsd, the console keeper). A process is either our child
(spawned here) or attached from persisted state by pid and start time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

from .. import host
from ..errors import LaunchError
from . import console_keeper

log = logging.getLogger(__name__)
_POLL = 0.02
STRAY_KILL_TIMEOUT = 5.0
"""Longest wait for a stray VMM (see `kill_strays`) to exit after SIGKILL."""

VMM_PROGRAMS = (
    "qemu-system-",
    "qemu-storage-daemon",
    "virtiofsd",
    "firecracker",
    "cloud-hypervisor",
    "acrn-dm",
)
"""What `kill_strays` may kill: the basename of argv[0] starts with one of these."""


def read_end(path: str, max_bytes: int) -> str | None:
    """The last `max_bytes` of a file (a log), decoded with undecodable bytes replaced; None
    when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def read_tail(paths: Sequence[str], max_bytes: int = 4096) -> str:
    """The last `max_bytes` of each existing file in `paths`, joined (for error messages)."""
    parts = [data for data in (read_end(p, max_bytes) for p in paths) if data and data.strip()]
    return "\n".join(parts)


def log_tail(path: str, max_lines: int = 20, max_bytes: int = 8192) -> str:
    """The last lines of a log file ("" when it is missing)."""
    data = read_end(path, max_bytes)
    return "\n".join(data.splitlines()[-max_lines:]) if data else ""


def _private(path: str, flags: int) -> int:
    """`open()` opener creating the file 0600."""
    return os.open(path, flags, 0o600)


def _popen(
    name: str,
    cmd: list[str],
    output_path: str,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: int | None,
    stdout: int | None,
    pass_fds: Sequence[int],
) -> subprocess.Popen[bytes]:
    """`VmmProcess.spawn`'s fork and exec (quick: nothing here waits on the child)."""
    try:
        with contextlib.ExitStack() as stack:
            if stdout is None:
                log = stack.enter_context(open(output_path, "ab", buffering=0, opener=_private))
                stdout = log.fileno()
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(pass_fds),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                umask=0o077,  # its sockets (API, console, vsock) and files are private
            )
    except OSError as e:
        raise LaunchError(f"cannot execute {name} {cmd[0]}: {e.strerror}", argv=cmd) from e


class VmmProcess:
    """One VMM or helper process (QEMU, Firecracker, cloud-hypervisor, acrn-dm, virtiofsd,
    the console keeper...) we started, or attached to from persisted state, and must not leak.

    A pidfd is held from spawn or attach until the process is known to have exited: waiting
    watches it, and every signal goes through it, so a pid reused by another process is never
    hit. The process is a `subprocess.Popen` child, not tied to any event loop.
    """

    def __init__(
        self,
        name: str,
        pid: int,
        start_time: int | None,
        pidfd: int | None,
        argv: Sequence[str] = (),
        log_paths: Sequence[str] = (),
        popen: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.name = name
        self.pid = pid
        self.start_time = start_time
        self.argv = list(argv)
        self.log_paths = list(log_paths)
        self._pidfd = pidfd
        self._popen = popen
        self._exit_code: int | None = None

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        output_path: str,
        *,
        log_paths: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        pass_fds: Sequence[int] = (),
        netns: str | None = None,
    ) -> VmmProcess:
        """Start `argv` in its own session (in network namespace `netns`, if given) with umask
        077, stdout and stderr appended to `output_path` (created 0600; or written to the fd
        `stdout`, such as the pipe of a console log keeper), stdin from /dev/null (or the fd
        `stdin`), keeping the fds `pass_fds`.

        Raises `LaunchError` when the binary cannot be executed at all.
        """
        cmd = list(argv)
        if netns:
            cmd = [shutil.which("nsenter") or "nsenter", f"--net={netns}", "--", *cmd]
        popen = _popen(name, cmd, output_path, env, cwd, stdin, stdout, pass_fds)
        try:
            pidfd = os.pidfd_open(popen.pid)  # our unreaped child: the pid is still its own
        except OSError:
            popen.kill()
            popen.wait()
            raise
        start = host.process_start_time(popen.pid)
        return cls(name, popen.pid, start, pidfd, cmd, [output_path, *log_paths], popen)

    @classmethod
    def attach(
        cls, name: str, pid: int, start_time: int | None, log_paths: Sequence[str] = ()
    ) -> VmmProcess:
        """A handle on a process started by someone else (from persisted state): live only
        while `pid` is still the process that started at `start_time`."""
        return cls(name, pid, start_time, host.pidfd_of(pid, start_time), (), log_paths)

    @property
    def is_child(self) -> bool:
        """True when this process was spawned by us (we reap it)."""
        return self._popen is not None

    @property
    def exit_code(self) -> int | None:
        """The exit code once it is known (negative: killed by that signal); None while it
        runs, or when it was someone else's child."""
        self.alive()  # collects the status of a process that has just exited
        if self._popen is not None:
            return self._popen.returncode
        return self._exit_code

    def alive(self) -> bool:
        """True until the process has exited (a zombie counts as exited)."""
        if self._pidfd is None:
            return False
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        if readable:
            self._reap()
            return False
        return True

    def log_tail(self, max_bytes: int = 4096) -> str:
        """The end of the process's output and log files."""
        return read_tail(self.log_paths, max_bytes)

    def launch_error(self, message: str) -> LaunchError:
        """A `LaunchError` carrying this process's exit code, argv and log tail."""
        return LaunchError(
            f"{self.name}: {message}",
            exit_code=self.exit_code,
            argv=self.argv,
            log_tail=self.log_tail(),
        )

    async def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to end; True when it has (and is reaped)."""
        if not self.alive():
            return True
        assert self._pidfd is not None
        await wait_pidfd(self._pidfd, timeout)
        return not self.alive()

    def send_signal(self, sig: int) -> bool:
        """Send `sig` through the pidfd; False when the process is already gone."""
        if not self.alive():
            return False
        assert self._pidfd is not None
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    async def stop(
        self, first: int = signal.SIGTERM, grace: float = 5.0, kill_wait: float = 5.0
    ) -> None:
        """Send `first`, wait `grace` seconds, then SIGKILL and wait `kill_wait`; reaps a child.

        A process that is already gone (or whose pid now belongs to another process) gets no
        signal at all.
        """
        if not self.alive():
            return
        if self.send_signal(first) and await self.wait(grace):
            return
        self.send_signal(signal.SIGKILL)
        if not await self.wait(kill_wait):
            log.warning("%s (pid %d) survived SIGKILL for %gs", self.name, self.pid, kill_wait)

    def _reap(self) -> None:
        """Collect the exit status (of our child; of another's child if it is ours after
        all) and drop the pidfd: the process is gone."""
        if self._popen is not None:
            self._popen.wait()
        elif self._pidfd is not None:
            try:
                res = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                res = None
            if res is not None:
                code = res.si_status
                self._exit_code = code if res.si_code == os.CLD_EXITED else -code
        self.close()

    def close(self) -> None:
        """Release the pidfd (the process itself is left alone)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self) -> None:
        self.close()


async def wait_pidfd(pidfd: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the process behind `pidfd` to exit (the fd turns
    readable); True when it has. Works for any process, our child or not."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await asyncio.wait_for(exited, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


def processes_using(directory: str, programs: tuple[str, ...] = ()) -> list[int]:
    """Pids of the processes (but this one) whose command line names a path inside `directory`
    (a VM directory: its sockets, logs, disks); with `programs`, only those whose argv[0]
    basename starts with one of them."""
    me = os.getpid()
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and int(entry) != me and _uses(int(entry), directory, programs)
    ]


def _uses(pid: int, directory: str, programs: tuple[str, ...] = ()) -> bool:
    """Whether process `pid`'s command line names a path inside `directory` (and, with
    `programs`, its argv[0] basename starts with one of them)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    if os.fsencode(directory.rstrip("/") + "/") not in cmdline:
        return False
    program = os.path.basename(cmdline.split(b"\0", 1)[0]).decode(errors="replace")
    return not programs or program.startswith(programs)


def kill_strays(
    vm_dir: str, timeout: float = STRAY_KILL_TIMEOUT, known: Collection[int] = ()
) -> list[int]:
    """SIGKILL every VMM (see `VMM_PROGRAMS`) whose command line names a file in `vm_dir`, and
    wait up to `timeout` seconds for them to exit; returns their pids. The `known` ones are
    not strays: the caller is killing them already.

    Finds what no driver knew about: a manager killed between launching the VMM and recording
    its pid, a cache server killed mid-boot. Anything else that mentions the directory (an
    operator's `tail -f` of its console log) is no VMM and is left alone. Each process is
    pinned by a pidfd and its command line read again before the signal, so a pid reused
    meanwhile is never hit.
    """
    pinned: dict[int, int] = {}
    try:
        for pid in set(processes_using(vm_dir, VMM_PROGRAMS)) - set(known):
            fd = host.pidfd_of(pid, host.process_start_time(pid))
            if fd is not None:
                pinned[pid] = fd
        for pid in [pid for pid in pinned if not _uses(pid, vm_dir, VMM_PROGRAMS)]:
            os.close(pinned.pop(pid))  # another process got the pid between scan and pin
        for pid, fd in pinned.items():
            log.warning("VM dir %s: killing stray VMM process %d", vm_dir, pid)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        _wait_pidfds(list(pinned.values()), timeout)
        return sorted(pinned)
    finally:
        for fd in pinned.values():
            os.close(fd)


def _wait_pidfds(fds: Sequence[int], timeout: float) -> None:
    """Wait up to `timeout` seconds for every process behind `fds` to exit."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    left = len(fds)
    while left and (remaining := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(remaining * 1000):
            poller.unregister(fd)
            left -= 1


def threads_named(pid: int, pattern: re.Pattern[str]) -> dict[int, int]:
    """Number -> thread id for the threads of `pid` whose name (`comm`) matches `pattern`, the
    number being the pattern's first group (how VMMs name their vCPU threads).

    Raises `OSError` when the process's task list cannot be read (it is gone).
    """
    task_dir = f"/proc/{pid}/task"
    out: dict[int, int] = {}
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/comm", encoding="utf-8", errors="replace") as f:
                comm = f.read().strip()
        except OSError:
            continue
        m = pattern.match(comm)
        if m:
            out[int(m.group(1))] = int(tid)
    return out


async def wait_for_path(
    path: str, proc: VmmProcess, timeout: float, what: str, *, is_socket: bool = True
) -> None:
    """Wait until `path` exists (a socket the process creates); `LaunchError` if it dies first.

    Raises `VMTimeoutError` when `timeout` passes with the process alive but no path.
    """
    import stat

    from ..errors import VMTimeoutError

    deadline = time.monotonic() + timeout
    while True:
        try:
            st = os.stat(path)
            if not is_socket or stat.S_ISSOCK(st.st_mode):
                return
        except FileNotFoundError:
            pass
        if not proc.alive():
            await proc.wait(1.0)
            raise proc.launch_error(f"exited before creating its {what} {path}")
        if time.monotonic() >= deadline:
            raise VMTimeoutError(f"{proc.name}: {what} {path} did not appear within {timeout:g}s")
        await asyncio.sleep(_POLL)


def console_keeper_command(path: str, max_bytes: int) -> list[str]:
    """The argv that runs the keeper of `path` (stdlib only: `-S`; its stdin: the pipe)."""
    return host.python_command(console_keeper.__file__, path, str(max_bytes), site=False)


async def start_console_keeper(
    spawn: Callable[[list[str], int], Awaitable[object]], path: str, max_bytes: int
) -> int:
    """Start the keeper of console log `path` (see console_keeper) with `spawn(argv,
    stdin_fd)`; returns its pipe's write end, for the VMM to write the console into (the
    caller closes it once the VMM holds a copy: the keeper then sees end of file when the
    VMM exits)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        await spawn(console_keeper_command(path, max_bytes), read_end)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return write_end
