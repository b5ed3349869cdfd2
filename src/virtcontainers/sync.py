"""A synchronous facade over `Sandbox`, for scripts that do not use asyncio.

Each sandbox owns a private event loop; calls run it until their coroutine completes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from . import sandbox as _async
from .inventory import SandboxInfo

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .agent import ExecResult, ExitStatus
    from .agent import OutputStream as _AsyncStream
    from .agent import Process as _AsyncProcess
    from .agent.process import StartOptions
    from .config import HypervisorConfig
    from .containers import Container as _AsyncContainer
    from .devices import BlockDrive
    from .hypervisor import VMState
    from .types import HypervisorType

T = TypeVar("T")

__all__ = ["Container", "OutputStream", "Process", "Sandbox", "SandboxInfo"]


class Sandbox:
    """Blocking twin of `virtcontainers.Sandbox`: `with Sandbox() as sb: sb.exec([...])`."""

    def __init__(
        self,
        id: str | None = None,
        hypervisor: str | HypervisorType = "qemu",
        config: HypervisorConfig | None = None,
        **kwargs: Any,
    ) -> None:
        self._runner = asyncio.Runner()
        self._sb = _async.Sandbox(id, hypervisor, config, **kwargs)

    @classmethod
    def _wrap(cls, runner: asyncio.Runner, sb: _async.Sandbox) -> Sandbox:
        self = cls.__new__(cls)
        self._runner = runner
        self._sb = sb
        return self

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    @property
    def id(self) -> str:
        """The sandbox id."""
        return self._sb.id

    @property
    def state(self) -> VMState:
        """Lifecycle state of the VM."""
        return self._sb.state

    @property
    def aio(self) -> _async.Sandbox:
        """The underlying async sandbox (use only on this object's own loop)."""
        return self._sb

    def create(self) -> None:
        """Validate and prepare without launching."""
        self._run(self._sb.create())

    def start(self) -> None:
        """Boot the VM and connect to its agent."""
        self._run(self._sb.start())

    def stop(self, force: bool = False) -> None:
        """Stop the VM and release everything (closes this object's loop)."""
        try:
            self._run(self._sb.stop(force=force))
        finally:
            self._runner.close()

    def detach(self) -> None:
        """Let go without stopping the VM (closes this object's loop)."""
        try:
            self._run(self._sb.detach())
        finally:
            self._runner.close()

    def pause(self) -> None:
        """Freeze the guest."""
        self._run(self._sb.pause())

    def resume(self) -> None:
        """Resume the guest."""
        self._run(self._sb.resume())

    def exec(
        self,
        argv: list[str] | str,
        *,
        stdin: bytes = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command in the guest."""
        return self._run(self._sb.exec(argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout))

    def start_process(self, argv: list[str] | str, **options: Unpack[StartOptions]) -> Process:
        """Start a process in the guest (arguments as `virtcontainers.Sandbox.start_process`)."""
        return Process(self._runner, self._run(self._sb.start_process(argv, **options)))

    def attach_process(
        self, handle: int, *, keep: bool = False, offsets: tuple[int, int] = (0, 0)
    ) -> Process:
        """A handle on a process started earlier (e.g. detached, by another manager)."""
        aio = self._sb.attach_process(handle, keep=keep, offsets=offsets)
        return Process(self._runner, self._run(aio))

    def create_container(self, command: list[str] | None = None, **kwargs: Any) -> Container:
        """A container in the sandbox (arguments as `virtcontainers.Sandbox.create_container`)."""
        return Container(self._runner, self._run(self._sb.create_container(command, **kwargs)))

    def container(self, id: str | None = None) -> Container:
        """One of the sandbox's containers (the only one when `id` is None)."""
        return Container(self._runner, self._sb.container(id))

    def write_file(self, guest_path: str, data: bytes, mode: int = 0o644) -> None:
        """Create or replace a guest file."""
        self._run(self._sb.write_file(guest_path, data, mode))

    def read_file(self, guest_path: str) -> bytes:
        """Read a guest file."""
        return self._run(self._sb.read_file(guest_path))

    def copy_in(self, host_path: str, guest_path: str) -> None:
        """Copy a host file into the guest."""
        self._run(self._sb.copy_in(host_path, guest_path))

    def copy_out(self, guest_path: str, host_path: str) -> None:
        """Copy a guest file to the host."""
        self._run(self._sb.copy_out(guest_path, host_path))

    def add_disk(self, path: str, id: str | None = None, *, read_only: bool = False) -> BlockDrive:
        """Hot-add a disk."""
        return self._run(self._sb.add_disk(path, id, read_only=read_only))

    def remove_disk(self, drive: BlockDrive | str) -> None:
        """Hot-remove a disk."""
        self._run(self._sb.remove_disk(drive))

    def resize(self, vcpus: int | None = None, memory_mb: int | None = None) -> None:
        """Change vCPUs and/or memory."""
        self._run(self._sb.resize(vcpus=vcpus, memory_mb=memory_mb))

    def __enter__(self) -> Sandbox:
        try:
            self.start()
        except BaseException:
            self._runner.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @staticmethod
    def list(run_root: str | None = None) -> list[SandboxInfo]:
        """Every persisted sandbox."""
        return _async.Sandbox.list(run_root)

    @classmethod
    def attach(cls, id: str, run_root: str | None = None) -> Sandbox:
        """Take over a sandbox persisted by another process."""
        runner = asyncio.Runner()
        try:
            sb = runner.run(_async.Sandbox.attach(id, run_root))
        except BaseException:
            runner.close()
            raise
        return cls._wrap(runner, sb)


class OutputStream:
    """Blocking twin of `virtcontainers.agent.OutputStream`: `for chunk in proc.stdout`."""

    def __init__(self, runner: asyncio.Runner, stream: _AsyncStream) -> None:
        self._runner = runner
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                yield self._runner.run(self._stream.__anext__())
            except StopAsyncIteration:
                return

    def read(self) -> bytes:
        """Everything until the process exits."""
        return self._runner.run(self._stream.read())

    def read_nowait(self) -> bytes:
        """What has arrived and not been read yet, without waiting."""
        return self._stream.read_nowait()


class Process:
    """Blocking twin of `virtcontainers.agent.Process` (same methods, without `await`)."""

    def __init__(self, runner: asyncio.Runner, proc: _AsyncProcess) -> None:
        self._runner = runner
        self.aio = proc
        """The underlying async process (use only on its sandbox's own loop)."""
        self.stdout = OutputStream(runner, proc.stdout)
        self.stderr = OutputStream(runner, proc.stderr)

    @property
    def handle(self) -> int:
        """The agent's name for the process (for `attach_process`)."""
        return self.aio.handle

    @property
    def pid(self) -> int:
        """Its pid in the guest."""
        return self.aio.pid

    @property
    def returncode(self) -> ExitStatus | None:
        """The exit status once known."""
        return self.aio.returncode

    def write_stdin(self, data: bytes | str) -> None:
        """Write to its stdin."""
        self._runner.run(self.aio.write_stdin(data))

    def close_stdin(self) -> None:
        """Close its stdin."""
        self._runner.run(self.aio.close_stdin())

    def signal(self, sig: int) -> None:
        """Send it a signal."""
        self._runner.run(self.aio.signal(sig))

    def resize(self, rows: int, cols: int) -> None:
        """Resize its terminal."""
        self._runner.run(self.aio.resize(rows, cols))

    def wait(self) -> ExitStatus:
        """Wait for it to end."""
        return self._runner.run(self.aio.wait())


class Container:
    """Blocking twin of `virtcontainers.containers.Container`."""

    def __init__(self, runner: asyncio.Runner, container: _AsyncContainer) -> None:
        self._runner = runner
        self.aio = container
        """The underlying async container (use only on its sandbox's own loop)."""

    @property
    def id(self) -> str:
        return self.aio.id

    def start(self, **kwargs: Any) -> Process:
        """Start its process (arguments as the async `start`)."""
        return Process(self._runner, self._runner.run(self.aio.start(**kwargs)))

    def run(self, *, stdin: bytes = b"", timeout: float | None = None) -> ExecResult:
        """Start and wait, collecting the output."""
        return self._runner.run(self.aio.run(stdin=stdin, timeout=timeout))

    def wait(self) -> ExecResult:
        return self._runner.run(self.aio.wait())

    def exec(self, argv: list[str], **kwargs: Any) -> ExecResult:
        """Run a command inside the running container."""
        return self._runner.run(self.aio.exec(argv, **kwargs))

    def kill(self, sig: int = 15) -> None:
        self._runner.run(self.aio.kill(sig))

    def pid(self) -> int:
        """The guest pid of its first process."""
        return self._runner.run(self.aio.pid())

    def pids(self) -> list[int]:
        return self._runner.run(self.aio.pids())

    def delete(self) -> None:
        self._runner.run(self.aio.delete())
