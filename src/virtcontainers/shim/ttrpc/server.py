"""A ttrpc server on a Unix socket: unary and streaming methods, deadlines, metadata.

Behaves as containerd's Go server does on bad input: an oversized frame, an unparsable request,
an even stream id, an unknown service or method each get a status on that stream and the
connection keeps serving. Peers must be root or the server's own user (SO_PEERCRED), as with
ttrpc's UnixSocketRequireSameUser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from ..proto.ttrpc import request_pb2
from .framing import Flag, MessageType, OversizedError, encode, read_frame
from .status import Code, TtrpcError

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)


@dataclass
class CallContext:
    """What a handler knows about its call: service, method, metadata, deadline (loop time)."""

    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    deadline: float | None = None


class ServerStream(Generic[Req]):
    """A streaming call seen from the server: receive the client's messages, send replies."""

    def __init__(self, conn: _Connection, stream_id: int, request_type: type[Req]) -> None:
        self._conn = conn
        self._id = stream_id
        self._type = request_type
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def recv(self) -> Req | None:
        """The client's next message; None once the client has closed its side."""
        data = await self._inbox.get()
        if data is None:
            self._inbox.put_nowait(None)
            return None
        return _decode(self._type, data)

    async def send(self, message: Message) -> None:
        await self._conn.send(self._id, MessageType.DATA, message.SerializeToString())


UnaryHandler = Callable[[CallContext, Any], Awaitable[Message]]
StreamHandler = Callable[[CallContext, ServerStream[Any]], Awaitable[Message | None]]


@dataclass(frozen=True)
class Method:
    """A method's request type and its handler: unary or streaming (exactly one is set)."""

    request_type: type[Message]
    unary: UnaryHandler | None = None
    streaming: StreamHandler | None = None


class Service:
    """A named ttrpc service (e.g. "containerd.task.v2.Task") and its methods."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.methods: dict[str, Method] = {}

    def unary(self, name: str, request_type: type[Req], handler: UnaryHandler) -> None:
        self.methods[name] = Method(request_type, unary=handler)

    def stream(self, name: str, request_type: type[Req], handler: StreamHandler) -> None:
        self.methods[name] = Method(request_type, streaming=handler)


def _decode(request_type: type[Req], data: bytes) -> Req:
    try:
        return request_type.FromString(data)
    except DecodeError as e:
        raise TtrpcError(
            Code.INTERNAL, f"ttrpc: error unmarshalling payload of {request_type.__name__}: {e}"
        ) from e


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class _Connection:
    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.tasks: set[asyncio.Task[None]] = set()
        self.streams: dict[int, ServerStream[Any]] = {}

    def abort(self) -> None:
        """End the connection: its read loop stops, in-flight calls are cancelled."""
        self.writer.transport.abort()

    async def send(self, stream_id: int, type_: int, data: bytes, flags: int = 0) -> None:
        if self.writer.is_closing():
            return
        try:
            frame = encode(stream_id, type_, data, flags)
        except ValueError as e:
            if type_ != MessageType.RESPONSE:
                raise TtrpcError(Code.RESOURCE_EXHAUSTED, str(e)) from e
            frame = encode(stream_id, type_, _response(TtrpcError(Code.RESOURCE_EXHAUSTED, str(e))))
        self.writer.write(frame)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def respond(self, stream_id: int, error: TtrpcError) -> None:
        await self.send(stream_id, MessageType.RESPONSE, _response(error))

    async def run(self) -> None:
        try:
            while True:
                try:
                    header, data = await read_frame(self.reader)
                except OversizedError as e:
                    await self.respond(
                        e.header.stream_id, TtrpcError(Code.RESOURCE_EXHAUSTED, str(e))
                    )
                    continue
                if header.type == MessageType.REQUEST:
                    await self._request(header.stream_id, header.flags, data)
                elif header.type == MessageType.DATA:
                    self._data(header.stream_id, header.flags, data)
                # Other types are ignored, for compatibility with future versions.
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()

    def _data(self, stream_id: int, flags: int, data: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            log.debug("ttrpc: data for unknown stream %d dropped", stream_id)
            return
        if not flags & Flag.NO_DATA:
            stream._inbox.put_nowait(data)
        if flags & Flag.REMOTE_CLOSED:
            stream._inbox.put_nowait(None)
            del self.streams[stream_id]

    async def _request(self, stream_id: int, flags: int, data: bytes) -> None:
        try:
            request = request_pb2.Request.FromString(data)
        except DecodeError as e:
            await self.respond(
                stream_id, TtrpcError(Code.INVALID_ARGUMENT, f"unmarshal request error: {e}")
            )
            return
        if stream_id % 2 != 1:
            await self.respond(
                stream_id,
                TtrpcError(
                    Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
                ),
            )
            return
        loop = asyncio.get_running_loop()
        ctx = CallContext(request.service, request.method)
        for kv in request.metadata:
            ctx.metadata.setdefault(kv.key, []).append(kv.value)
        if request.timeout_nano > 0:
            ctx.deadline = loop.time() + request.timeout_nano / 1e9
        stream: ServerStream[Any] | None = None
        if flags & (Flag.REMOTE_OPEN | Flag.REMOTE_CLOSED):
            method = self.server.lookup(request.service, request.method)
            stream = ServerStream(self, stream_id, method.request_type if method else Message)
            if request.payload or not flags & Flag.REMOTE_OPEN:
                stream._inbox.put_nowait(request.payload)
            if flags & Flag.REMOTE_OPEN:
                self.streams[stream_id] = stream
            else:
                stream._inbox.put_nowait(None)
        task = loop.create_task(self._call(stream_id, ctx, request.payload, stream))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _call(
        self, stream_id: int, ctx: CallContext, payload: bytes, stream: ServerStream[Any] | None
    ) -> None:
        try:
            reply = await self.server.dispatch(ctx, payload, stream)
        except TtrpcError as e:
            await self.respond(stream_id, e)
        else:
            body = request_pb2.Response(payload=reply.SerializeToString() if reply else b"")
            await self.send(stream_id, MessageType.RESPONSE, body.SerializeToString())
        finally:
            self.streams.pop(stream_id, None)


def _response(error: TtrpcError) -> bytes:
    return request_pb2.Response(status=error.to_status()).SerializeToString()


class Server:
    """Serves services on Unix sockets until closed."""

    def __init__(self, services: Iterable[Service] = ()) -> None:
        self.services: dict[str, Service] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: dict[_Connection, asyncio.Future[None]] = {}
        for service in services:
            self.register(service)

    def register(self, service: Service) -> None:
        if service.name in self.services:
            raise ValueError(f"ttrpc service {service.name} registered twice")
        self.services[service.name] = service

    def lookup(self, service: str, method: str) -> Method | None:
        svc = self.services.get(service)
        return svc.methods.get(method) if svc else None

    async def dispatch(
        self, ctx: CallContext, payload: bytes, stream: ServerStream[Any] | None
    ) -> Message | None:
        """Run the handler of one call; every failure becomes a TtrpcError."""
        svc = self.services.get(ctx.service)
        if svc is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"service {ctx.service}")
        method = svc.methods.get(ctx.method)
        if method is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"method {ctx.method}")
        if (method.streaming is None) != (stream is None):
            kind = "unary" if stream is None else "streaming"
            raise TtrpcError(
                Code.INVALID_ARGUMENT, f"method {ctx.service}/{ctx.method} is not {kind}"
            )
        delay = None if ctx.deadline is None else ctx.deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(delay):
                if method.streaming is not None and stream is not None:
                    return await method.streaming(ctx, stream)
                assert method.unary is not None
                return await method.unary(ctx, _decode(method.request_type, payload))
        except TtrpcError:
            raise
        except TimeoutError as e:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded") from e
        except Exception as e:
            log.exception("ttrpc: %s/%s failed", ctx.service, ctx.method)
            raise TtrpcError(Code.UNKNOWN, str(e) or type(e).__name__) from e

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock)
        if uid not in (0, os.getuid()):
            log.warning("ttrpc: refusing a connection from uid %d", uid)
            writer.close()
            return
        conn = _Connection(self, reader, writer)
        done = self._connections[conn] = asyncio.get_running_loop().create_future()
        try:
            await conn.run()
        finally:
            del self._connections[conn]
            done.set_result(None)

    async def listen(self, path: str) -> None:
        """Serve on a new Unix socket at `path` (created mode 0600)."""
        old = os.umask(0o177)
        try:
            srv = await asyncio.start_unix_server(self._accept, path=path)
        finally:
            os.umask(old)
        self._servers.append(srv)

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening Unix socket."""
        self._servers.append(await asyncio.start_unix_server(self._accept, sock=sock))

    async def close(self) -> None:
        """Stop accepting, end every connection (in-flight calls are cancelled)."""
        for srv in self._servers:
            srv.close()
        waits = list(self._connections.values())
        for conn in list(self._connections):
            conn.abort()
        if waits:
            await asyncio.gather(*waits)
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
