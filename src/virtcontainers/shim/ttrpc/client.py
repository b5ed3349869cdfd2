"""A ttrpc client: concurrent unary calls and streams over one Unix socket connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ..proto.ttrpc import request_pb2
from .framing import Flag, MessageType, OversizedError, encode, read_frame
from .status import Code, ConnectionClosedError, TtrpcError

Resp = TypeVar("Resp", bound=Message)
Metadata = Mapping[str, str | Sequence[str]]


def _request(
    service: str, method: str, payload: bytes, timeout: float | None, metadata: Metadata | None
) -> bytes:
    req = request_pb2.Request(service=service, method=method, payload=payload)
    if timeout is not None:
        req.timeout_nano = max(1, int(timeout * 1e9))
    for key, values in (metadata or {}).items():
        for value in [values] if isinstance(values, str) else values:
            req.metadata.add(key=key, value=value)
    return req.SerializeToString()


class _Call:
    """Frames arriving on one stream: DATA payloads, then the end (a Response or DATA[RC])."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[int, int, bytes] | None] = asyncio.Queue()


class ClientStream:
    """A streaming call: send messages (until close_send), receive the server's messages."""

    def __init__(self, client: Client, stream_id: int, call: _Call) -> None:
        self._client = client
        self._id = stream_id
        self._call = call
        self._done = False

    async def send(self, message: Message) -> None:
        await self._client._send(self._id, MessageType.DATA, message.SerializeToString())

    async def close_send(self) -> None:
        """Tell the server no more messages follow."""
        flags = Flag.REMOTE_CLOSED | Flag.NO_DATA
        await self._client._send(self._id, MessageType.DATA, b"", flags)

    async def recv(self, response_type: type[Resp]) -> Resp | None:
        """The server's next message; None when the stream ended well; TtrpcError otherwise."""
        while not self._done:
            item = await self._call.inbox.get()
            if item is None:
                self._done = True
                raise ConnectionClosedError()
            type_, flags, data = item
            if type_ == MessageType.RESPONSE:
                self._done = True
                self._client._calls.pop(self._id, None)
                resp = request_pb2.Response.FromString(data)
                if resp.status.code != Code.OK:
                    raise TtrpcError.from_status(resp.status)
                return None
            if flags & Flag.REMOTE_CLOSED:
                self._done = True
                self._client._calls.pop(self._id, None)
            if not flags & Flag.NO_DATA:
                return response_type.FromString(data)
        return None


class Client:
    """One connection to a ttrpc server. `await Client.connect(path)`; `close()` when done."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._calls: dict[int, _Call] = {}
        self._closed = False
        self._reading = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str, timeout: float | None = None) -> Client:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    def _new_stream(self) -> tuple[int, _Call]:
        if self._closed:
            raise ConnectionClosedError()
        stream_id = self._next_id
        self._next_id += 2
        call = self._calls[stream_id] = _Call()
        return stream_id, call

    async def _send(self, stream_id: int, type_: int, data: bytes, flags: int = 0) -> None:
        try:
            frame = encode(stream_id, type_, data, flags)
        except ValueError as e:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, str(e)) from e
        if self._closed or self._writer.is_closing():
            raise ConnectionClosedError()
        self._writer.write(frame)
        try:
            await self._writer.drain()
        except ConnectionError as e:
            raise ConnectionClosedError(f"ttrpc: connection lost: {e}") from e

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[Resp],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Resp:
        """One unary call. Raises TtrpcError with the server's status (or DEADLINE_EXCEEDED)."""
        stream_id, call = self._new_stream()
        try:
            payload = _request(service, method, request.SerializeToString(), timeout, metadata)
            await self._send(stream_id, MessageType.REQUEST, payload)
            try:
                async with asyncio.timeout(timeout):
                    item = await call.inbox.get()
            except TimeoutError as e:
                raise TtrpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded") from e
        finally:
            self._calls.pop(stream_id, None)
        if item is None:
            raise ConnectionClosedError()
        type_, _flags, data = item
        if type_ != MessageType.RESPONSE:
            raise TtrpcError(
                Code.INTERNAL, f"ttrpc: unexpected message type {type_} on a unary call"
            )
        try:
            resp = request_pb2.Response.FromString(data)
            if resp.status.code != Code.OK:
                raise TtrpcError.from_status(resp.status)
            return response_type.FromString(resp.payload)
        except DecodeError as e:
            raise TtrpcError(
                Code.INTERNAL, f"ttrpc: bad response to {service}/{method}: {e}"
            ) from e

    async def stream(
        self,
        service: str,
        method: str,
        request: Message | None = None,
        *,
        client_streaming: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ClientStream:
        """Open a streaming call; `request` is the first (for a server stream, the only)
        message; with `client_streaming` more follow through `send`, then `close_send`."""
        stream_id, call = self._new_stream()
        payload = request.SerializeToString() if request is not None else b""
        flags = Flag.REMOTE_OPEN if client_streaming else Flag.REMOTE_CLOSED
        try:
            await self._send(
                stream_id,
                MessageType.REQUEST,
                _request(service, method, payload, timeout, metadata),
                flags,
            )
        except BaseException:
            self._calls.pop(stream_id, None)
            raise
        return ClientStream(self, stream_id, call)

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    header, data = await read_frame(self._reader)
                except OversizedError as e:
                    # Fail the call that the oversized answer belonged to; keep the connection.
                    call = self._calls.get(e.header.stream_id)
                    if call is not None:
                        err = TtrpcError(Code.RESOURCE_EXHAUSTED, str(e)).to_status()
                        body = request_pb2.Response(status=err).SerializeToString()
                        call.inbox.put_nowait((MessageType.RESPONSE, 0, body))
                    continue
                call = self._calls.get(header.stream_id)
                if call is not None:
                    call.inbox.put_nowait((header.type, header.flags, data))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._closed = True
            for call in self._calls.values():
                call.inbox.put_nowait(None)

    async def close(self) -> None:
        self._closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
