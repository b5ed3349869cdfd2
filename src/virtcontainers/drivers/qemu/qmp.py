"""The one adapter over `qemu.qmp`'s async QMPClient: connect, serialised commands, events.

Nothing else in the project imports `qemu.qmp`. Errors come out as `HypervisorError`s:
`QMPCommandError` (QEMU answered with an error) or `QMPDisconnectedError` (no session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    Runstate,
)
from qemu.qmp import StateError as QMPStateError

from ...errors import HypervisorError, VMTimeoutError

log = logging.getLogger(__name__)

# The library logs every refused connection or hang-up at ERROR; this adapter turns each into
# an exception for its caller instead. Silence it unless the application configured it.
_lib_log = logging.getLogger("qemu.qmp")
if _lib_log.level == logging.NOTSET:
    _lib_log.setLevel(logging.CRITICAL)

Event = Mapping[str, Any]


class QMPCommandError(HypervisorError):
    """QEMU refused a QMP command; carries the command and QEMU's error class and text."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")


class QMPDisconnectedError(HypervisorError):
    """There is no QMP session: the connection was refused, lost or never made."""


#: How often a wait for an event checks that the session is still up.
EVENT_LIVENESS_POLL = 0.25


class EventStream:
    """Events of some names received while the stream is open (registered before a command)."""

    def __init__(self, listener: EventListener, qmp: QMP | None = None) -> None:
        self._listener = listener
        self._qmp = qmp

    async def wait(
        self, predicate: Callable[[Event], bool] | None = None, *, timeout: float, what: str = ""
    ) -> Event:
        """The first queued/arriving event matching `predicate`.

        `VMTimeoutError` when none comes within `timeout`; `QMPDisconnectedError` as soon as
        the session drops (a QEMU that died will never send it).
        """
        names = ", ".join(self._listener.names or ["any"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise VMTimeoutError(
                    f"no QMP event {names}{' ' + what if what else ''} within {timeout:g}s"
                )
            try:
                async with asyncio.timeout(min(left, EVENT_LIVENESS_POLL)):
                    event: Event = await self._listener.get()
            except TimeoutError:
                if self._qmp is not None and not self._qmp.connected:
                    raise QMPDisconnectedError(
                        f"QMP {self._qmp.name}: connection lost while waiting for event "
                        f"{names}{' ' + what if what else ''}"
                    ) from None
                continue
            if predicate is None or predicate(event):
                return event


class QMP:
    """One QMP session with one VM. Commands are serialised by an asyncio lock."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._client = QMPClient(name)
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        """True while the session is up (False once QEMU hung up)."""
        return self._client.runstate == Runstate.RUNNING

    async def connect(self, target: str | socket.socket, timeout: float) -> None:
        """Connect to a socket path or a connected socket (ownership passes), then negotiate.

        Raises `QMPDisconnectedError` if the peer refuses or hangs up, `VMTimeoutError` when
        the greeting does not come within `timeout`.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._client.connect(target)
        except TimeoutError:
            await self._reset()
            if isinstance(target, socket.socket):
                target.close()
            raise VMTimeoutError(f"QMP {self.name}: no greeting within {timeout:g}s") from None
        except ConnectError as exc:
            if isinstance(target, socket.socket):
                target.close()
            where = target if isinstance(target, str) else "pre-connected socket"
            raise QMPDisconnectedError(
                f"QMP {self.name}: cannot connect to {where}: {exc}"
            ) from exc

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, timeout: float = 30.0
    ) -> Any:
        """Run one command and return its `return` value."""
        async with self._lock:
            return await self._execute(command, arguments, timeout)

    async def pass_fd(self, fd: int, name: str, timeout: float = 30.0) -> None:
        """Give QEMU a copy of `fd` named `name` (SCM_RIGHTS + `getfd`), for the commands
        that take `fd:NAME`: the file is opened here, its path never reaches QEMU or a shell."""
        async with self._lock:
            if not self.connected:
                raise QMPDisconnectedError(f"QMP {self.name}: not connected (passing {name})")
            try:
                self._client.send_fd_scm(fd)
            except (QMPStateError, OSError) as exc:
                raise QMPDisconnectedError(f"QMP {self.name}: cannot pass {name}: {exc}") from exc
            await self._execute("getfd", {"fdname": name}, timeout)

    async def _execute(
        self, command: str, arguments: Mapping[str, object] | None, timeout: float
    ) -> Any:
        if not self.connected:
            raise QMPDisconnectedError(f"QMP {self.name}: not connected (running {command})")
        try:
            async with asyncio.timeout(timeout):
                return await self._client.execute(command, dict(arguments or {}) or None)
        except ExecuteError as exc:
            raise QMPCommandError(command, exc.error_class, str(exc)) from None
        except TimeoutError:
            raise VMTimeoutError(
                f"QMP {self.name}: {command} got no answer within {timeout:g}s"
            ) from None
        except (ExecInterruptedError, QMPStateError, EOFError, OSError) as exc:
            why = str(exc) or type(exc).__name__
            raise QMPDisconnectedError(
                f"QMP {self.name}: connection lost during {command}: {why}"
            ) from exc

    @contextlib.contextmanager
    def events(self, *names: str) -> Iterator[EventStream]:
        """Collect events named `names` (all if none) until the block exits."""
        listener = EventListener(list(names) or None)
        with self._client.listen(listener):
            yield EventStream(listener, self)

    async def close(self) -> None:
        """Drop the session; errors of a dead peer are expected and swallowed."""
        await self._reset()

    async def _reset(self) -> None:
        try:
            await self._client.disconnect()
        except (EOFError, OSError, ConnectError, QMPStateError) as exc:
            log.debug("QMP %s: disconnect: %r", self.name, exc)
        except Exception as exc:  # the bottom half re-raises whatever ended it
            log.debug("QMP %s: disconnect: %r", self.name, exc)
