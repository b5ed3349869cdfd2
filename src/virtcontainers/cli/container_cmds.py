"""Containers from the command line: `virtc run --image/--bundle`, `virtc exec` into a
container, `virtc ps` (registered on import; the container code is imported inside)."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from .app import Globals
from .options import SANDBOX_ID, WHICH_CONTAINER, guest_command
from .output import emit_json, line, run_async
from .registry import Arg, command

if TYPE_CHECKING:
    from ..agent import ExecResult, ExitStatus, Process
    from ..sandbox import Sandbox
    from .logs import TerminalFilter


def run_container(
    g: Globals, a: argparse.Namespace, started: Callable[[], Awaitable[Sandbox]]
) -> int | None:
    """`virtc run --image|--bundle`: boot (`started()`: a booted sandbox, or one from the VM
    factory), create the container, run it with its output streamed as written (our stdin too
    with -i, a terminal with -t); exit with its code. With `--detach`, leave it running and
    print the sandbox id."""
    from .app import EXIT_TIMED_OUT

    argv = guest_command(a) if [w for w in a.command if w != "--"] else None
    ids: list[str] = []

    async def body() -> ExitStatus | None:
        sb = await started()
        ids.append(sb.id)
        try:
            container = await sb.create_container(argv, env=a.env, cwd=a.workdir, user=a.user)
            if a.detach:
                await container.start(detach=True, tty=a.tty)
                sb._persist()
                await sb.detach()
                return None
            import shutil  # bz2, lzma, fnmatch: not for the commands that only register here

            size = shutil.get_terminal_size() if a.tty else os.terminal_size((80, 24))
            proc = await container.start(
                tty=a.tty, rows=size.lines, cols=size.columns, timeout=a.exec_timeout
            )
            status = await stream(proc, a.stdin, tty=a.tty)
        except BaseException:
            await sb.stop()
            raise
        await sb.stop()
        return status

    from .console import raw_terminal

    with raw_terminal(a.tty and a.stdin):
        status = run_async(body())
    if status is None:
        line(ids[0])
        return None
    if g.json:
        emit_json(
            {"exit_code": status.exit_code, "signal": status.signal, "timed_out": status.timed_out}
        )
    if status.timed_out:
        return EXIT_TIMED_OUT
    return 128 + status.signal if status.signal else status.exit_code


async def stream(proc: Process, interactive: bool, tty: bool = False) -> ExitStatus:
    """Copy the process's output to ours as it arrives (and our stdin to it; with `tty`, our
    terminal's new sizes to its terminal); its status."""
    import asyncio

    helpers = [asyncio.ensure_future(_feed(proc) if interactive else proc.close_stdin())]
    if tty:
        helpers.append(asyncio.ensure_future(_follow_size(proc)))
    try:
        await asyncio.gather(_pump(proc.stdout, _Sink(1)), _pump(proc.stderr, _Sink(2)))
        return await proc.wait()
    finally:
        for task in helpers:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _follow_size(proc: Process) -> None:
    """On each SIGWINCH, give the process's terminal our terminal's size, until cancelled."""
    import asyncio
    import shutil
    import signal

    from ..agent import AgentRequestError

    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGWINCH, changed.set)
    except (RuntimeError, ValueError):  # not the main thread: signals are not ours
        return
    try:
        while True:
            await changed.wait()
            changed.clear()
            size = shutil.get_terminal_size()
            with contextlib.suppress(AgentRequestError):  # the process has just exited
                await proc.resize(size.lines, size.columns)
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


async def _feed(proc: Process) -> None:
    """Our stdin to the process, then its end. The reads block in a daemon thread that
    nothing waits for, so the command may end (or be interrupted) while stdin stays open."""
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    room = threading.Semaphore(4)  # chunks read ahead of the guest

    def read() -> None:
        while room.acquire():
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, data)
            except RuntimeError:  # the loop is closed: the command is over
                return
            if not data:
                return

    threading.Thread(target=read, name="virtc-stdin", daemon=True).start()
    while data := await chunks.get():
        room.release()
        await proc.write_stdin(data)
    await proc.close_stdin()


class _Sink:
    """One of our output fds; with `safe`, guest bytes pass the terminal filter first."""

    def __init__(self, fd: int, safe: bool = False) -> None:
        self.fd = fd
        self._filter: TerminalFilter | None = None
        if safe:
            from .logs import TerminalFilter

            self._filter = TerminalFilter()

    def write(self, data: bytes) -> None:
        if self._filter is not None:
            data = self._filter.feed(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        f, self._filter = self._filter, None
        if f is not None:
            self.write(f.flush())


async def _pump(chunks: AsyncIterator[bytes], sink: _Sink) -> None:
    import asyncio

    async for chunk in chunks:
        await asyncio.to_thread(sink.write, chunk)


def container_logs(g: Globals, a: argparse.Namespace) -> None:
    """`virtc logs ID`: what the guest kept of the (detached) container process's stdout and
    stderr (the newest 1 MiB of each), to ours; with --follow, then what it writes, until it
    exits. Terminals get guest bytes through the terminal filter (not with --raw); pipes get
    them unchanged.

    Each look is a short attach with `keep` (reading logs never collects the process) from
    the stream offsets already shown: the agent's channel may take one host connection at a
    time (virtio-serial), so a follower must not hold it between looks."""
    import asyncio
    import errno
    import io
    import signal

    from ..agent import AgentRequestError
    from ..errors import StateError
    from .commands import attach
    from .logs import FOLLOW_INTERVAL, tail_start

    sinks = [_Sink(fd, safe=os.isatty(fd) and not a.raw) for fd in (1, 2)]
    offsets = (0, 0)

    async def look() -> tuple[list[bytes], bool]:
        """Output since `offsets` (stdout, stderr; a note first if some was dropped), and
        whether the process has exited."""
        nonlocal offsets
        sb = await attach(g, a.sandbox_id)
        try:
            if not sb.containers:
                raise StateError(
                    f"sandbox {sb.id} has no container (its guest console: "
                    f"virtc logs --console {sb.id})"
                )
            container = sb.container(a.container)
            try:
                proc = await container.attach(keep=True, offsets=offsets)
            except AgentRequestError as e:
                if e.errno != errno.ESRCH:
                    raise
                raise StateError(
                    f"container {container.id} has no output kept: its process was not "
                    "started detached (-d), or has exited and been collected"
                ) from None
            await (await sb.agent()).ping()  # what it sends comes before this answer
            data = [proc.stdout.read_nowait(), proc.stderr.read_nowait()]
            lost = sum(proc.offsets) - sum(offsets)
            offsets = (proc.offsets[0] + len(data[0]), proc.offsets[1] + len(data[1]))
            if lost:
                data[1] = f"virtc: {lost} bytes of output were dropped\n".encode() + data[1]
            return data, proc.done()
        finally:
            await sb.detach()

    async def body() -> None:
        data, done = await look()
        # Once following, Ctrl-C ends it between looks: a cancellation inside one could be
        # lost (and the follower run on) or cut an attach short.
        stop = asyncio.Event()
        if a.follow:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
        if a.tail is not None:
            data = [d[tail_start(io.BytesIO(d), a.tail)[0] :] for d in data]
        while True:
            for chunk, sink in zip(data, sinks, strict=True):
                await asyncio.to_thread(sink.write, chunk)  # not while holding the agent
            if done or not a.follow:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FOLLOW_INTERVAL)
            if stop.is_set():
                return
            try:
                data, done = await look()
            except StateError:
                return  # stopped meanwhile (or its process collected by another attach)

    try:
        run_async(body())
    finally:
        for sink in sinks:
            sink.close()


async def exec_in_container(
    sb: Sandbox,
    container_id: str | None,
    argv: list[str],
    env: list[str],
    cwd: str | None,
    user: str | None,
    data: bytes,
    timeout: float | None,
) -> ExecResult:
    """`virtc exec ID -- CMD` in a sandbox that runs a container: inside the container."""
    from ..containers.spec import resolve_user

    container = sb.container(container_id)
    ids = None
    if user:
        uid, gid, _ = resolve_user(user, str(sb.workload.get("lower", "")))
        ids = (uid, gid)
    return await container.exec(argv, env=env, cwd=cwd, user=ids, stdin=data, timeout=timeout)


@command(
    "ps",
    WHICH_CONTAINER,
    SANDBOX_ID,
    Arg("--json", dest="json_output", action="store_true", help="Machine-readable output."),
)
def ps(g: Globals, a: argparse.Namespace) -> None:
    """The processes of a sandbox's container (guest pids)."""
    from .commands import attach

    async def body() -> list[tuple[int, str]]:
        sb = await attach(g, a.sandbox_id)
        try:
            return await sb.container(a.container).processes()
        finally:
            await sb.detach()

    procs = run_async(body())
    if a.json_output or g.json:
        emit_json([{"pid": pid, "command": cmd} for pid, cmd in procs])
        return
    line("PID   COMMAND")
    for pid, cmd in procs:
        line(f"{pid:<5} {cmd}")


def _split(arg: str) -> tuple[str | None, str]:
    """`ID:/path` -> (ID, /path); anything else is a host path."""
    head, sep, tail = arg.partition(":")
    if sep and tail.startswith("/") and head and "/" not in head:
        return head, tail
    return None, arg


@command(
    "cp",
    Arg("src", metavar="SRC", help="Host path, or ID:/path in a container."),
    Arg("dst", metavar="DST", help="Host path, or ID:/path in a container."),
    WHICH_CONTAINER,
)
def cp(g: Globals, a: argparse.Namespace) -> None:
    """Copy files or directories between the host and a sandbox's container."""
    from ..errors import ConfigError
    from .commands import attach

    src_id, src_path = _split(a.src)
    dst_id, dst_path = _split(a.dst)
    if (src_id is None) == (dst_id is None):
        raise ConfigError("cp: exactly one of SRC and DST must be ID:/path")
    sandbox_id = src_id or dst_id
    assert sandbox_id is not None

    async def body() -> None:
        sb = await attach(g, sandbox_id)
        try:
            container = sb.container(a.container)
            if dst_id is not None:
                await container.copy_in(src_path, dst_path)
            else:
                await container.copy_out(src_path, dst_path)
        finally:
            await sb.detach()

    run_async(body())
