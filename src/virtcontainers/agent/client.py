"""Host side of the guest agent: `AgentClient` over a Unix socket or hybrid vsock.

One reader task demultiplexes replies by request id, so many requests (execs,
file copies, pings) can be in flight on one connection. When the connection dies
every pending request fails with `AgentError`; nothing waits forever on a dead VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import functools
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from ..errors import AgentError
from ..types import AGENT_VSOCK_PORT
from . import protocol as p
from .process import Process, StartOptions, argv_fields, start_request, status_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..network.model import GuestNetwork

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0
"""Longest wait for the `OK <n>` line of a hybrid vsock `CONNECT`."""
HELLO_RETRY = (2.0, 3.0, 5.0)
"""How long each hello waits before the client reconnects and says hello again.

Staying connected is what lets a booting guest answer the moment its agent starts;
reconnecting recovers an agent stuck in the middle of a frame from a dead client.
"""
RECONNECT_PAUSE = (0.1, 0.25, 0.5)
"""Time disconnected before a new hello, long enough for the guest to see the hangup."""
EXEC_GRACE = 10.0
"""Extra host-side wait past an exec's (or a hardware wait's) own timeout before giving up
on the agent."""
DEFAULT_REQUEST_TIMEOUT = 30.0
"""Default deadline of a request that should be answered promptly (ping, files, set_time...);
requests that may legitimately run longer (an exec without a timeout) instead fail once the
agent has been silent this long and does not answer a liveness ping within it either."""
RETRY_PAUSE = 0.02
READ_CHUNK = 1 << 18
NOTICE_FIELDS = 8
"""Fields of an id-0 notice looked at for its message (the agent sends errno, message)."""
NOTICE_CHARS = 200
HELLO_ID = p.MAX_ID
"""The request id of hellos; ordinary requests never reach it before wrapping."""


@dataclass(frozen=True)
class HybridVsock:
    """A hybrid vsock endpoint: the VMM's Unix socket plus the guest port to `CONNECT` to."""

    uds_path: str
    port: int = AGENT_VSOCK_PORT

    def __str__(self) -> str:
        return f"hybrid vsock {self.uds_path} port {self.port}"


@dataclass(frozen=True)
class VsockAddress:
    """A guest agent reached directly over AF_VSOCK (QEMU with vhost-vsock-pci)."""

    cid: int
    port: int = AGENT_VSOCK_PORT

    def __str__(self) -> str:
        return f"vsock cid {self.cid} port {self.port}"


Target = str | os.PathLike[str] | HybridVsock | VsockAddress
T = TypeVar("T")


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one command run by the agent."""

    exit_code: int
    """Exit status, or -1 when the process was killed by a signal."""
    stdout: bytes
    stderr: bytes
    signal: int = 0
    """The signal that killed the process (0 if it exited)."""
    timed_out: bool = False
    """The agent killed the process group because the exec's timeout expired."""
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the process exited with status 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class AgentInfo:
    """What a ping returns."""

    version: str
    uptime: float
    """Guest uptime in seconds (CLOCK_BOOTTIME)."""
    running: int
    """Processes the agent is running for exec requests."""


@dataclass(frozen=True)
class WaitResult:
    """What `AgentClient.wait_hardware` found once the guest saw the hardware."""

    device: str | None
    """The block device with the wanted serial (e.g. `sda`), None if none was asked for."""
    dev_path: str | None
    """Its device node (e.g. `/dev/sda`), which exists when the wait returns."""
    cpus_online: int | None
    """Online CPUs when the wait returned, None if no CPU count was asked for."""
    mem_blocks: int
    """Memory blocks the agent brought online during the wait."""


class AgentRequestError(AgentError):
    """The agent refused or failed one request; `errno` is the guest's error number."""

    def __init__(self, op: str, errno: int, message: str) -> None:
        self.op = op
        self.errno = errno
        self.message = message
        name = errno_mod.errorcode.get(errno, str(errno))
        super().__init__(f"agent {op} failed ({name}): {message}")


class AgentTimeoutError(AgentError, TimeoutError):
    """The agent did not answer a request in time."""


class AgentClient:
    """A connection to one guest agent. Create with `await AgentClient.connect(...)`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: p.FrameDecoder,
        *,
        target: str,
        agent_version: str = "",
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = decoder
        self.target = target
        self.agent_version = agent_version
        self.request_timeout = _check_request_timeout(request_timeout)
        self._pending: dict[int, asyncio.Future[p.Frame]] = {}
        self._next_id = 1
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._error: AgentError | None = None
        self._last_heard = asyncio.get_running_loop().time()
        self._probe: asyncio.Task[p.Fields] | None = None
        self._hooks: dict[int, Callable[[p.Frame], None]] = {}
        self._procs: dict[int, Process] = {}
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"agent-reader {target}"
        )

    # -- connecting -------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        target: Target,
        timeout: float = 30.0,
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        booting: bool = False,
    ) -> AgentClient:
        """Connect and say hello, retrying until `timeout` (the VM may still be booting).

        `booting`: the VM was just launched, so no other client has talked to its agent and
        none can have left it mid-frame: a connection once made is kept, its hello waiting
        up to `timeout` (a TCG boot outlasts the first of `HELLO_RETRY`, and an agent that
        started during the reconnect's pause was answered that much later: up to 0.3 s).

        `target` is the Unix socket path of a virtio-serial port (QEMU), a
        `HybridVsock` (Firecracker, Cloud Hypervisor) or a `VsockAddress`
        (vhost-vsock). `request_timeout` bounds every later request (see
        `DEFAULT_REQUEST_TIMEOUT`): a guest that stops answering fails them with
        `AgentTimeoutError` instead of hanging the caller.
        """
        _check_request_timeout(request_timeout)
        if isinstance(target, HybridVsock | VsockAddress):
            if not 0 < target.port < 2**32:
                raise AgentError(f"{target}: port {target.port} out of range")
            if isinstance(target, VsockAddress) and not 2 < target.cid < 2**32 - 1:
                raise AgentError(f"{target}: guest CIDs are 3..2**32-2")
            name = str(target)
        else:
            target = os.fspath(target)
            name = target
        if timeout <= 0:
            raise AgentError(f"connect to the agent at {name}: timeout must be positive")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no attempt"
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AgentTimeoutError(
                    f"agent at {name} did not answer within {timeout:g}s (last: {last})"
                )
            try:
                reader, writer = await _open(target, remaining)
            except AgentError as exc:
                if last == "no attempt" or loop.time() < deadline:
                    last = str(exc)  # one the deadline cut short tells less than the one before
                await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - loop.time())))
                continue
            wait = deadline - loop.time()
            if not booting:
                wait = min(HELLO_RETRY[min(attempt, len(HELLO_RETRY) - 1)], wait)
            attempt += 1
            try:
                version, decoder = await _hello(reader, writer, max(wait, 0.0))
            except (AgentError, OSError, TimeoutError) as exc:
                last = f"hello: {exc}" if str(exc) else "hello: no answer"
                await _close_writer(writer)
                pause = RECONNECT_PAUSE[min(attempt - 1, len(RECONNECT_PAUSE) - 1)]
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                continue
            except BaseException:
                await _close_writer(writer)
                raise
            return cls(
                reader,
                writer,
                decoder,
                target=name,
                agent_version=version,
                request_timeout=request_timeout,
            )

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closed (by `close()` or because it died)."""
        return self._closed

    async def close(self) -> None:
        """Close the connection; pending requests fail with `AgentError`. Idempotent."""
        if not self._closed:
            self._fail_all(AgentError(f"connection to the agent at {self.target} was closed"))
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        await _close_writer(self._writer)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- operations -------------------------------------------------------------------------

    async def ping(self, *, timeout: float | None = None) -> AgentInfo:
        """Round trip to the agent; returns its version, uptime and load.

        `timeout` (default: the client's `request_timeout`) bounds the wait for the answer.
        """
        if timeout is not None and not timeout > 0:
            raise AgentError(f"ping: timeout must be positive, got {timeout!r}")
        f = await self._call("ping", p.MsgType.PING, p.Fields(), wait=timeout)
        return AgentInfo(
            version=f.str_(p.Tag.VERSION),
            uptime=f.int_(p.Tag.UPTIME_NS) / 1e9,
            running=f.int_(p.Tag.RUNNING),
        )

    async def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | str = b"",
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run `argv` in the guest and wait for it; stdout and stderr are kept apart.

        `env` entries are added to the agent's base environment (PATH, HOME, TERM).
        With `timeout` (seconds) the agent kills the process group when it expires
        and the result has `timed_out` set. Without one the process may run for as
        long as it likes, but a guest agent that stops answering (no reply to a
        liveness ping within `request_timeout`) fails the call with `AgentTimeoutError`.
        Output beyond `max_output` bytes per stream (default 16 MiB) is dropped and
        flagged as truncated.
        """
        req = argv_fields("exec", argv, env)
        if cwd is not None:
            req.add(p.Tag.CWD, cwd)
        data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
        if data:
            req.add(p.Tag.STDIN, data)
        wait: float | None = None  # none of its own: the liveness pings bound it
        if timeout is not None:
            if timeout <= 0:
                raise AgentError(f"exec: timeout must be positive, got {timeout}")
            req.add(p.Tag.TIMEOUT_MS, max(1, round(timeout * 1000)))
            wait = timeout + EXEC_GRACE
        if max_output is not None:
            if max_output <= 0:
                raise AgentError(f"exec: max_output must be positive, got {max_output}")
            req.add(p.Tag.MAX_OUTPUT, max_output)
        f = await self._call(
            f"exec {list(argv)!r}", p.MsgType.EXEC, req, wait=wait, long=True, cancel=True
        )
        trunc = f.int_(p.Tag.TRUNCATED)
        return ExecResult(
            exit_code=f.int_(p.Tag.EXIT_CODE, -1),
            stdout=f.bytes_(p.Tag.STDOUT),
            stderr=f.bytes_(p.Tag.STDERR),
            signal=f.int_(p.Tag.SIGNAL),
            timed_out=bool(f.int_(p.Tag.TIMED_OUT)),
            stdout_truncated=bool(trunc & p.TRUNC_STDOUT),
            stderr_truncated=bool(trunc & p.TRUNC_STDERR),
        )

    async def read_file(self, path: str) -> bytes:
        """The contents of a regular file in the guest (up to the frame limit)."""
        f = await self._call(
            f"read_file {path}", p.MsgType.READ_FILE, _path_fields(path), cancel=True
        )
        return f.bytes_(p.Tag.DATA)

    async def write_file(
        self, path: str, data: bytes | str, mode: int = 0o644, *, make_parents: bool = False
    ) -> None:
        """Create or replace a guest file with `data` and permission bits `mode`."""
        if not 0 <= mode <= 0o7777:
            raise AgentError(f"write_file {path}: mode {mode:#o} out of range")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        req = _path_fields(path).add(p.Tag.DATA, raw).add(p.Tag.MODE, mode)
        if make_parents:
            req.add(p.Tag.FLAGS, p.WRITE_MKDIRS)
        await self._call(f"write_file {path}", p.MsgType.WRITE_FILE, req, cancel=True)

    async def start_process(self, argv: Sequence[str], **options: Unpack[StartOptions]) -> Process:
        """Start `argv` in the guest and return its `Process` handle once it runs.

        Output streams back as it is written (`Process.stdout` / `stderr`); stdin stays open
        until `close_stdin()`. `env` is added to PATH, HOME, TERM; `uid`/`gid`/`groups`
        switch user (default: root); `root` is a guest directory the process is chrooted
        into (after MS_MOVE onto / in a new mount namespace: the guest's root is an
        initramfs); `namespaces` names new ones to enter (`NAMESPACES`: mount, uts, ipc,
        pid, net; `hostname` needs uts); `cwd` applies inside `root`. With `tty` the process
        gets a terminal of `rows` x `cols` (stdout and stderr both on `stdout`). A `detach`ed
        process survives this connection (reattach with `attach_process(handle)`); without
        it closing the connection kills it. With `timeout` the agent kills it (and its
        process group) after that many seconds. Set-up failures (no such binary, bad cwd,
        a root that cannot be entered) raise `AgentRequestError` with the guest's errno.
        """
        req = start_request(argv, **options)
        made: list[Process] = []
        tty, detach = bool(options.get("tty")), bool(options.get("detach"))
        hook = functools.partial(self._register, made, tty=tty, detached=detach)
        await self._call(f"start {list(argv)!r}", p.MsgType.START, req, cancel=True, hook=hook)
        return made[0]

    async def attach_process(
        self, handle: int, *, keep: bool = False, offsets: tuple[int, int] = (0, 0)
    ) -> Process:
        """A handle on a process started earlier (by any connection, typically a detached one):
        this connection gets its output from now on, starting with what the guest kept of it
        from the stream `offsets` (stdout, stderr) on (see `Process.offsets`); if it has
        already exited, its output and exit status come at once. Once its exit has been
        reported the agent forgets it, unless `keep` (a log reader): then it stays, output
        and status, for the next attach. `AgentRequestError` (ESRCH) if the agent has no
        such process."""
        if isinstance(handle, bool) or not isinstance(handle, int) or not 0 < handle < 2**32:
            raise AgentError(f"attach_process: bad process handle {handle!r}")
        if any(isinstance(o, bool) or not isinstance(o, int) or o < 0 for o in offsets):
            raise AgentError(f"attach_process: bad stream offsets {offsets!r}")
        made: list[Process] = []
        hook = functools.partial(self._register, made, tty=None, detached=True)
        req = p.Fields().add(p.Tag.PROC, handle)
        if keep:
            req.add(p.Tag.FLAGS, p.ATTACH_KEEP)
        if offsets != (0, 0):
            req.add(p.Tag.OUT_FROM, offsets[0]).add(p.Tag.ERR_FROM, offsets[1])
        await self._call(f"attach to process {handle}", p.MsgType.ATTACH, req, hook=hook)
        return made[0]

    def _register(
        self, made: list[Process], frame: p.Frame, *, tty: bool | None, detached: bool
    ) -> None:
        """In the reader, on a START/ATTACH reply: the Process exists before its output."""
        if frame.type not in (p.MsgType.START | p.REPLY, p.MsgType.ATTACH | p.REPLY):
            return  # not a reply to either: `_call` reports it
        f = p.Fields.decode(frame.payload, max_fields=p.NOTICE_FIELDS)
        handle = f.int_(p.Tag.PROC)
        if not 0 < handle < 2**32:
            raise p.ProtocolError(f"process handle {handle} out of range")
        if handle in self._procs:  # attached twice from here: one handle, the newest
            self._procs.pop(handle)._lost(AgentError(f"process {handle} was attached again"))
        proc = Process(
            self,
            handle,
            f.int_(p.Tag.PID),
            tty=bool(f.int_(p.Tag.TTY)) if tty is None else tty,
            detached=detached,
        )
        proc.dropped_in_guest = f.int_(p.Tag.DROPPED)
        proc.offsets = (f.int_(p.Tag.OUT_FROM), f.int_(p.Tag.ERR_FROM))
        self._procs[handle] = proc
        made.append(proc)

    async def set_time(self, when: float | None = None) -> None:
        """Set the guest's wall clock (default: the host's now), e.g. after a template clone."""
        ns = time.time_ns() if when is None else round(when * 1e9)
        req = p.Fields().add(p.Tag.SEC, ns // 1_000_000_000).add(p.Tag.NSEC, ns % 1_000_000_000)
        await self._call("set_time", p.MsgType.SET_TIME, req)

    async def add_entropy(self, data: bytes | None = None) -> None:
        """Credit `data` (default 64 random host bytes) to the guest RNG and reseed it."""
        raw = os.urandom(64) if data is None else bytes(data)
        if not raw:
            raise AgentError("add_entropy: data must not be empty")
        await self._call("add_entropy", p.MsgType.ADD_ENTROPY, p.Fields().add(p.Tag.DATA, raw))

    async def online(self, *, cpus: bool = True, memory: bool = True) -> tuple[int, int]:
        """Bring offline CPUs / memory blocks online (after hotplug); returns the counts."""
        flags = (p.ONLINE_CPUS if cpus else 0) | (p.ONLINE_MEMORY if memory else 0)
        f = await self._call("online", p.MsgType.ONLINE, p.Fields().add(p.Tag.FLAGS, flags))
        return f.int_(p.Tag.CPUS), f.int_(p.Tag.MEM_BLOCKS)

    async def wait_hardware(
        self,
        *,
        block_serial: str | None = None,
        cpus: int | None = None,
        memory: bool = False,
        timeout: float,
    ) -> WaitResult:
        """Wait in the guest until hotplugged hardware is usable; one round trip, no polling.

        The agent re-checks on every kernel uevent (and on a short timer), onlining offline
        CPUs (with `cpus`) and memory blocks (with `memory`) as they appear, and answers once
        a block device with serial `block_serial` (virtio-blk `serial` or SCSI VPD page
        0x80) has its /dev node and at least `cpus` CPUs are online. After `timeout`
        seconds it fails with `AgentRequestError` (errno ETIMEDOUT) saying what is missing.
        """
        op = "wait_hardware"
        req = p.Fields()
        if block_serial is not None:
            raw = block_serial.encode() if isinstance(block_serial, str) else b""
            if not raw or b"\0" in raw or len(raw) > p.MAX_SERIAL:
                raise AgentError(
                    f"{op}: block_serial must be a string of 1..{p.MAX_SERIAL} bytes without "
                    f"NUL, got {block_serial!r}"
                )
            req.add(p.Tag.SERIAL, raw)
        if cpus is not None:
            if isinstance(cpus, bool) or not isinstance(cpus, int):
                raise AgentError(f"{op}: cpus must be an integer, got {cpus!r}")
            if not 1 <= cpus <= p.MAX_WANT_CPUS:
                raise AgentError(f"{op}: cpus must be 1..{p.MAX_WANT_CPUS}, got {cpus}")
            req.add(p.Tag.WANT_CPUS, cpus)
        if memory:
            req.add(p.Tag.MEMORY, 1)
        if block_serial is None and cpus is None and not memory:
            raise AgentError(f"{op}: nothing to wait for (give block_serial, cpus or memory)")
        limit_s = p.MAX_WAIT_MS / 1000
        if not isinstance(timeout, int | float) or not 0 < timeout <= limit_s:
            raise AgentError(f"{op}: timeout must be in (0, {limit_s:g}] seconds, got {timeout!r}")
        req.add(p.Tag.TIMEOUT_MS, max(1, round(timeout * 1000)))
        f = await self._call(
            op, p.MsgType.WAIT, req, wait=timeout + EXEC_GRACE, long=True, cancel=True
        )
        device = f.get(p.Tag.DEVICE)
        path = f.get(p.Tag.PATH)
        return WaitResult(
            device=device.decode(errors="replace") if device is not None else None,
            dev_path=path.decode(errors="replace") if path is not None else None,
            cpus_online=f.int_(p.Tag.CPUS_ONLINE) if f.get(p.Tag.CPUS_ONLINE) is not None else None,
            mem_blocks=f.int_(p.Tag.MEM_BLOCKS),
        )

    async def configure_network(
        self,
        net: GuestNetwork,
        *,
        hosts: str | None = None,
        resolv: str | None = None,
        wait: float = 30.0,
    ) -> list[str]:
        """Configure the guest's network as `net` says, in one request the agent carries out
        by rtnetlink: loopback up, the hostname, each interface (found by MAC, waiting up to
        `wait` seconds for a hotplugged one) up with its MTU and addresses, then routes and
        static neighbours of those interfaces; `hosts` and `resolv` (when given) replace
        /etc/hosts and /etc/resolv.conf. Returns the guest's name for each interface.
        `AgentRequestError` names the step the guest refused."""
        op = "configure_network"
        limit_s = p.MAX_WAIT_MS / 1000
        if not isinstance(wait, int | float) or not 0 <= wait <= limit_s:
            raise AgentError(f"{op}: wait must be in [0, {limit_s:g}] seconds, got {wait!r}")
        req = p.Fields().add(p.Tag.TIMEOUT_MS, round(wait * 1000))
        macs: dict[str, str] = {}
        for iface in net.interfaces:
            link = p.Fields().add(p.Tag.MAC, iface.mac.lower()).add(p.Tag.MTU, iface.mtu)
            for a in iface.addresses:
                link.add(p.Tag.ADDRESS, str(a))
            req.add(p.Tag.LINK, link.encode())
            macs[iface.name] = iface.mac.lower()
        for r in net.routes:
            if r.device and r.device not in macs:
                continue  # leaves by an interface the guest is not given
            route = p.Fields().add(p.Tag.FAMILY, r.family)
            if r.dest:
                route.add(p.Tag.DEST, r.dest)
            if r.gateway:
                route.add(p.Tag.GATEWAY, r.gateway)
            if r.device:
                route.add(p.Tag.MAC, macs[r.device])
            req.add(p.Tag.ROUTE, route.encode())
        for nb in net.neighbours:
            if nb.device in macs:
                neigh = p.Fields().add(p.Tag.DEST, nb.ip).add(p.Tag.LLADDR, nb.mac.lower())
                req.add(p.Tag.NEIGH, neigh.add(p.Tag.MAC, macs[nb.device]).encode())
        if net.hostname:
            req.add(p.Tag.HOSTNAME, net.hostname)
        for tag, text in ((p.Tag.HOSTS, hosts), (p.Tag.RESOLV, resolv)):
            if text is not None:
                req.add(tag, text)
        f = await self._call(
            op, p.MsgType.NETWORK, req, wait=wait + EXEC_GRACE, long=True, cancel=True
        )
        return [d.decode(errors="replace") for d in f.all(p.Tag.DEVICE)]

    # -- plumbing ---------------------------------------------------------------------------

    def _new_id(self) -> int:
        while True:
            rid = self._next_id
            self._next_id = rid + 1 if rid < HELLO_ID - 1 else 1
            if rid not in self._pending:
                return rid

    async def _send(self, frame: bytes) -> None:
        async with self._send_lock:
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                err = AgentError(f"connection to the agent at {self.target} lost: {exc}")
                self._fail_all(err)
                raise err from exc

    async def _call(
        self,
        op: str,
        type_: p.MsgType,
        req: p.Fields,
        *,
        wait: float | None = None,
        long: bool = False,
        cancel: bool = False,
        hook: Callable[[p.Frame], None] | None = None,
    ) -> p.Fields:
        """Send one request and wait for its reply.

        The wait ends after `wait` seconds (default `request_timeout`); a `long` request
        has no deadline without `wait`. While a long wait goes on, an agent silent for
        `request_timeout` gets a liveness ping, and the request fails if that goes
        unanswered too. With `cancel`, a request given up on (timeout, cancellation) is
        cancelled in the guest. `hook` sees the reply frame in the reader task, before any
        frame that follows it is dispatched.
        """
        if self._closed:
            raise self._error or AgentError(f"connection to the agent at {self.target} is closed")
        payload = req.encode()
        if len(payload) > p.MAX_FRAME:
            raise AgentError(f"{op}: request of {len(payload)} bytes exceeds the frame limit")
        loop = asyncio.get_running_loop()
        limit = wait if wait is not None or long else self.request_timeout
        rid = self._new_id()
        fut: asyncio.Future[p.Frame] = loop.create_future()
        self._pending[rid] = fut
        if hook is not None:
            self._hooks[rid] = hook
        done = False
        try:
            await self._send(p.encode_frame(type_, rid, payload))
            frame = await self._await_watched(fut, op, limit=limit, long=long)
            done = True
        finally:
            self._pending.pop(rid, None)
            self._hooks.pop(rid, None)
            if not done and cancel and not self._closed:
                # The caller gave up: stop the guest's work instead of leaking it.
                with contextlib.suppress(AgentError):
                    req2 = p.Fields().add(p.Tag.TARGET, rid).add(p.Tag.SIGNAL, 9)
                    await self._send(
                        p.encode_frame(p.MsgType.CANCEL, self._new_id(), req2.encode())
                    )
        if frame.type == p.MsgType.ERROR:
            f = p.Fields.decode(frame.payload)
            raise AgentRequestError(op, f.int_(p.Tag.ERRNO), f.str_(p.Tag.MESSAGE))
        if frame.type != type_ | p.REPLY:
            raise p.ProtocolError(f"{op}: unexpected reply type 0x{frame.type:02x}")
        return p.Fields.decode(frame.payload)

    async def _await_watched(
        self, fut: asyncio.Future[T], op: str, *, limit: float | None = None, long: bool = True
    ) -> T:
        """`fut`'s result, waiting at most `limit` seconds (None: no limit); a `long` wait
        checks on the agent (`_check_alive`) each time it has been silent `request_timeout`."""
        loop = asyncio.get_running_loop()
        end = None if limit is None else loop.time() + limit
        while not fut.done():
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                raise AgentTimeoutError(
                    f"agent at {self.target} did not answer {op} within {limit:g}s"
                )
            step = left if not long else min(self.request_timeout, left or math.inf)
            await asyncio.wait({fut}, timeout=step)
            if not fut.done() and long and (end is None or loop.time() < end):
                await self._check_alive(op)
        return fut.result()

    async def _check_alive(self, op: str) -> None:
        """During a long wait: `AgentTimeoutError` naming `op` unless the agent was heard from
        within `request_timeout` or answers a ping in that time (one ping shared by all)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_heard < self.request_timeout:
            return
        if self._probe is None or self._probe.done():
            self._probe = loop.create_task(self._call("ping", p.MsgType.PING, p.Fields()))
            self._probe.add_done_callback(_retrieve)
        try:
            await asyncio.shield(self._probe)
        except AgentTimeoutError:
            raise AgentTimeoutError(
                f"agent at {self.target} stopped answering during {op}: no reply to a "
                f"liveness ping within {self.request_timeout:g}s"
            ) from None

    def _fail_all(self, err: AgentError) -> None:
        self._closed = True
        if self._error is None:
            self._error = err
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # a waiter may be gone: do not warn about it
        self._pending.clear()
        for proc in self._procs.values():
            proc._lost(err)
        self._procs.clear()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    raise AgentError(f"the agent at {self.target} closed the connection")
                self._last_heard = asyncio.get_running_loop().time()
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
        except asyncio.CancelledError:
            raise
        except AgentError as exc:
            self._fail_all(exc)
        except (OSError, ValueError) as exc:
            self._fail_all(AgentError(f"connection to the agent at {self.target} failed: {exc}"))

    def _dispatch(self, frame: p.Frame) -> None:
        if frame.id == 0 and frame.type in (p.MsgType.OUTPUT, p.MsgType.EXITED):
            self._notified(frame)
            return
        if frame.id == 0:
            # A notice. Decoded here in the reader, so only a bounded look at its start: a
            # guest's oversized frame must not stall every other reply of the process.
            try:
                raw = p.first_field(frame.payload, p.Tag.MESSAGE, max_fields=NOTICE_FIELDS)
            except p.ProtocolError as exc:
                raw = f"unreadable notice ({exc})".encode()
            text = (raw or b"").decode(errors="replace")
            log.warning("agent at %s: %r", self.target, text[:NOTICE_CHARS])
            return
        fut = self._pending.get(frame.id)
        if fut is not None and not fut.done():
            hook = self._hooks.pop(frame.id, None)
            if hook is not None and frame.type != p.MsgType.ERROR:
                try:
                    hook(frame)
                except AgentError as exc:
                    fut.set_exception(exc)
                    return
            fut.set_result(frame)

    def _notified(self, frame: p.Frame) -> None:
        """OUTPUT or EXITED of a started process (decoded here, in the reader: bounded)."""
        try:
            f = p.Fields.decode(frame.payload, max_fields=p.NOTICE_FIELDS)
            proc = self._procs.get(f.int_(p.Tag.PROC))
            if proc is None:
                return  # not (or no longer) ours: the guest may say anything
            if frame.type == p.MsgType.OUTPUT:
                proc._output(f.int_(p.Tag.STREAM), f.bytes_(p.Tag.DATA))
            else:
                del self._procs[proc.handle]
                proc._exited(status_of(f))
        except p.ProtocolError as exc:
            log.warning("agent at %s: bad process notification: %s", self.target, exc)


def _check_request_timeout(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise AgentError(f"request_timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def _retrieve(task: asyncio.Task[p.Fields]) -> None:
    """Mark a shared probe's outcome as seen (its waiters may all be gone)."""
    if not task.cancelled():
        task.exception()


def _path_fields(path: str) -> p.Fields:
    if not path or "\0" in path:
        raise AgentError(f"bad guest path {path!r}: must be non-empty without NUL bytes")
    return p.Fields().add(p.Tag.PATH, path)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


async def _open_vsock(
    target: VsockAddress, remaining: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        raise AgentError(f"{target}: AF_VSOCK unavailable on this host: {exc}") from None
    try:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (target.cid, target.port)), remaining)
        return await asyncio.open_connection(sock=sock, limit=READ_CHUNK)
    except TimeoutError:
        sock.close()
        raise AgentError(f"connect to {target} timed out") from None
    except OSError as exc:
        sock.close()
        raise AgentError(f"connect to {target}: {exc.strerror or exc}") from None


async def _open(
    target: str | HybridVsock | VsockAddress, remaining: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open the byte stream to the agent; `AgentError` if nothing listens (yet)."""
    if isinstance(target, VsockAddress):
        return await _open_vsock(target, remaining)
    path = target.uds_path if isinstance(target, HybridVsock) else target
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path, limit=READ_CHUNK), remaining
        )
    except TimeoutError:
        raise AgentError(f"connect to {path} timed out") from None
    except OSError as exc:
        raise AgentError(f"connect to {path}: {exc.strerror or exc}") from None
    if not isinstance(target, HybridVsock):
        return reader, writer
    try:
        writer.write(f"CONNECT {target.port}\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(
            reader.readline(), min(HANDSHAKE_TIMEOUT, max(remaining, 0.001))
        )
    except TimeoutError:
        await _close_writer(writer)
        raise AgentError(f"{target}: no answer to CONNECT") from None
    except (OSError, ValueError) as exc:
        await _close_writer(writer)
        raise AgentError(f"{target}: CONNECT failed: {exc}") from None
    text = line.decode(errors="replace").strip()
    if not text.startswith("OK "):
        await _close_writer(writer)
        reason = repr(text) if text else "connection closed (nothing listens on that port?)"
        raise AgentError(f"{target}: CONNECT refused: {reason}")
    return reader, writer


async def _hello(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wait: float
) -> tuple[str, p.FrameDecoder]:
    """Send a hello with a fresh nonce and wait for its echo: the agent version and decoder.

    Anything else received first (stale replies of an earlier connection, garbage)
    is skipped: the nonce tells this connection's answer apart.
    """
    nonce = os.urandom(8)
    decoder = p.FrameDecoder()
    hello = p.Fields().add(p.Tag.NONCE, nonce).encode()
    writer.write(p.encode_frame(p.MsgType.HELLO, HELLO_ID, hello))
    await writer.drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError("no answer")
        data = await asyncio.wait_for(reader.read(READ_CHUNK), left)
        if not data:
            raise AgentError("connection closed before the agent answered")
        try:
            frames = decoder.feed(data)
        except p.ProtocolError:
            decoder = p.FrameDecoder()
            continue
        for frame in frames:
            if frame.type != p.MsgType.HELLO | p.REPLY:
                continue
            with contextlib.suppress(p.ProtocolError):
                f = p.Fields.decode(frame.payload)
                if f.get(p.Tag.NONCE) == nonce:
                    return f.str_(p.Tag.VERSION), decoder
