"""A scripted fake QMP server for unit tests.

The script is a list of steps consumed in order: `Expect` (a command, with a canned reply or
error, optional events and side effects after it), `Event` (sent as soon as it reaches the head
of the script) and `Hangup`. `qmp_capabilities` is answered automatically. An unexpected
command is answered with a GenericError and recorded; `assert_done()` then fails the test with
a message naming what was expected and what came.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GREETING: dict[str, Any] = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"},
        "capabilities": ["oob"],
    }
}


@dataclass
class Expect:
    """Expect `command`; check its arguments (a dict for equality or a predicate) and answer."""

    command: str
    arguments: Mapping[str, Any] | Callable[[Mapping[str, Any]], bool] | None = None
    reply: Any = field(default_factory=dict)
    error: tuple[str, str] | None = None  # (class, desc)
    events: Sequence[Mapping[str, Any]] = ()  # {"event": name, "data": {...}} sent after the reply
    then: Callable[[], Any] | None = None  # side effect after replying (e.g. kill a process)
    delay: float = 0.0  # seconds before replying
    no_reply: bool = False  # swallow the command (hang up instead if `hangup`)
    hangup: bool = False  # close the connection after replying


@dataclass
class Event:
    """An event sent unprompted when it reaches the head of the script."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Hangup:
    """Close the connection when this step is reached (e.g. right after the greeting)."""


Step = Expect | Event | Hangup


def event_message(name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "event": name,
        "data": dict(data),
        "timestamp": {"seconds": 0, "microseconds": 0},
    }


class FakeQMPServer:
    """Serves one scripted QMP conversation, over a socketpair or a listening Unix socket."""

    def __init__(
        self, script: Sequence[Step] = (), *, greeting: Mapping[str, Any] | None = None
    ) -> None:
        self.script: list[Step] = list(script)
        self.greeting = dict(greeting or GREETING)
        self.received: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def add(self, *steps: Step) -> None:
        """Append steps to the script (e.g. for a second session)."""
        self.script.extend(steps)

    @property
    def commands(self) -> list[str]:
        """Names of the commands received, `qmp_capabilities` excluded."""
        return [
            m.get("execute", "") for m in self.received if m.get("execute") != "qmp_capabilities"
        ]

    # -- transports --------------------------------------------------------------------------
    async def socketpair(self) -> socket.socket:
        """Serve one end of a new socketpair; return the other (for the client)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self._spawn(reader, writer)
        return theirs

    async def listen(self, path: str) -> None:
        """Accept connections on a Unix socket path, one conversation per connection."""

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(reader, writer)

        self._server = await asyncio.start_unix_server(on_conn, path)

    def _spawn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in self._writers:
            w.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._writers.clear()

    # -- checks ------------------------------------------------------------------------------
    def assert_done(self) -> None:
        """Fail unless every step ran and nothing unexpected came."""
        problems = list(self.failures)
        pending = [s for s in self.script if not isinstance(s, Hangup)]
        if pending:
            problems.append(f"script steps never reached: {pending!r}")
        if problems:
            raise AssertionError("fake QMP server: " + "; ".join(problems))

    # -- the conversation --------------------------------------------------------------------
    async def _send(self, writer: asyncio.StreamWriter, msg: Mapping[str, Any]) -> None:
        writer.write(json.dumps(msg).encode() + b"\r\n")
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self._send(writer, self.greeting)
            buf = ""
            decoder = json.JSONDecoder()
            negotiated = False
            while True:
                # Like QEMU: no events before capabilities negotiation.
                if not await self._run_unprompted(writer, negotiated):
                    return
                # QMP is a stream of JSON objects, not necessarily newline-terminated.
                while True:
                    text = buf.lstrip()
                    try:
                        msg, end = decoder.raw_decode(text)
                        buf = text[end:]
                        break
                    except ValueError:
                        chunk = await reader.read(65536)
                        if not chunk:
                            if text:
                                self.failures.append(f"client sent invalid JSON {text!r}")
                            return
                        buf += chunk.decode()
                self.received.append(msg)
                negotiated = negotiated or msg.get("execute") == "qmp_capabilities"
                if not await self._answer(writer, msg):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _run_unprompted(self, writer: asyncio.StreamWriter, negotiated: bool) -> bool:
        """Send head-of-script events; False when a Hangup step says to close."""
        while self.script and (
            isinstance(self.script[0], Hangup) or (negotiated and isinstance(self.script[0], Event))
        ):
            step = self.script.pop(0)
            if isinstance(step, Hangup):
                return False
            await self._send(writer, event_message(step.name, step.data))
        return True

    async def _answer(self, writer: asyncio.StreamWriter, msg: Mapping[str, Any]) -> bool:
        command = str(msg.get("execute", ""))
        mid = msg.get("id")
        reply_id = {"id": mid} if mid is not None else {}
        if command == "qmp_capabilities" and not (
            self.script
            and isinstance(self.script[0], Expect)
            and self.script[0].command == "qmp_capabilities"
        ):
            await self._send(writer, {"return": {}, **reply_id})
            return True
        step = self.script[0] if self.script else None
        if not isinstance(step, Expect) or step.command != command:
            expected = step.command if isinstance(step, Expect) else "nothing more"
            self.failures.append(f"unexpected command {command!r} (expected {expected})")
            await self._send(
                writer,
                {
                    "error": {"class": "GenericError", "desc": f"fake: unexpected {command}"},
                    **reply_id,
                },
            )
            return True
        self.script.pop(0)
        args = msg.get("arguments", {}) or {}
        if callable(step.arguments):
            if not step.arguments(args):
                self.failures.append(f"{command}: arguments {args!r} rejected by the test")
        elif step.arguments is not None and dict(step.arguments) != dict(args):
            self.failures.append(
                f"{command}: arguments {args!r} differ from expected {dict(step.arguments)!r}"
            )
        if step.delay:
            await asyncio.sleep(step.delay)
        if step.no_reply:
            if step.then is not None:
                step.then()
            return not step.hangup
        if step.error is not None:
            cls, desc = step.error
            await self._send(writer, {"error": {"class": cls, "desc": desc}, **reply_id})
        else:
            await self._send(writer, {"return": step.reply, **reply_id})
        for ev in step.events:
            await self._send(writer, event_message(str(ev["event"]), ev.get("data", {})))
        if step.then is not None:
            step.then()
        return not step.hangup
