"""Fuzzing the wire decoders: agent frames (decoder, payload fields, a hostile agent peer)
and QMP replies (the adapter fed garbage by the fake QMP server). Only `VCError`s escape,
never another exception or a hang (every call is bounded)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import tempfile
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes.qmp_server import Expect, FakeQMPServer
from virtcontainers.agent import AgentClient
from virtcontainers.agent import protocol as p
from virtcontainers.drivers.qemu.qmp import QMP
from virtcontainers.errors import AgentError, VCError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
BOUND = 10.0


def header(type_: int, id_: int, length: int, version: int = p.PROTO_VERSION) -> bytes:
    head = struct.pack("<4sBBHII", p.MAGIC, version, type_, 0, id_, length)
    return head + struct.pack("<I", zlib.crc32(head))


frame_parts = st.one_of(
    st.binary(max_size=64),
    st.builds(
        p.encode_frame,
        st.integers(0, 255),
        st.integers(0, p.MAX_ID),
        st.binary(max_size=64),
    ),
    st.builds(header, st.integers(0, 255), st.integers(0, p.MAX_ID), st.integers(0, 2**32 - 1)),
    st.builds(
        header, st.integers(0, 255), st.integers(0, 9), st.integers(0, 64), st.integers(0, 255)
    ),
    st.just(p.MAGIC),
)


@SETTINGS
@given(st.lists(frame_parts, max_size=12), st.integers(1, 50))
def test_frame_decoder_takes_any_bytes(parts: list[bytes], chunk: int) -> None:
    data = b"".join(parts)
    decoder = p.FrameDecoder(max_frame=1 << 16)
    try:
        for i in range(0, len(data), chunk):
            for frame in decoder.feed(data[i : i + chunk]):
                assert 0 <= frame.type <= 255 and len(frame.payload) <= 1 << 16
    except p.ProtocolError:
        pass
    assert decoder.pending <= len(data)


@SETTINGS
@given(st.binary(max_size=200), st.lists(st.binary(max_size=32), min_size=1, max_size=4))
def test_valid_frames_survive_garbage_between_them(garbage: bytes, payloads: list[bytes]) -> None:
    garbage = garbage.replace(p.MAGIC[:1], b"")  # no magic: plain line noise
    stream = b"".join(
        garbage + p.encode_frame(p.MsgType.PING | p.REPLY, i + 1, pl)
        for i, pl in enumerate(payloads)
    )
    frames = p.FrameDecoder().feed(stream)
    assert [f.payload for f in frames] == payloads


@SETTINGS
@given(st.binary(max_size=300))
def test_fields_decode_any_payload(payload: bytes) -> None:
    try:
        f = p.Fields.decode(payload)
    except p.ProtocolError:
        return
    assert f.encode() == payload
    for tag in (p.Tag.EXIT_CODE, p.Tag.ERRNO):
        with contextlib.suppress(p.ProtocolError):
            f.int_(tag)


class HostileAgent:
    """Answers the hello properly, then replies to each request with `reply(frame)` bytes."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.dir = tempfile.mkdtemp(prefix="vcfz-", dir="/tmp")
        self.path = os.path.join(self.dir, "agent.sock")
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> HostileAgent:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        os.unlink(self.path)
        os.rmdir(self.dir)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = p.FrameDecoder()
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    if frame.type == p.MsgType.HELLO:
                        nonce = p.Fields.decode(frame.payload).bytes_(p.Tag.NONCE)
                        body = p.fields((p.Tag.NONCE, nonce), (p.Tag.VERSION, "hostile")).encode()
                        writer.write(p.encode_frame(p.MsgType.HELLO | p.REPLY, frame.id, body))
                    else:
                        out = self.reply(frame)
                        if out is None:
                            writer.close()
                            return
                        writer.write(out)
                await writer.drain()
        except (ConnectionError, p.ProtocolError):
            pass
        finally:
            writer.close()


REPLIES = {
    "garbage": lambda f: os.urandom(512),
    "hang-up": lambda f: None,
    "oversize": lambda f: header(f.type | p.REPLY, f.id, p.MAX_FRAME + 1),
    "wrong-version": lambda f: header(f.type | p.REPLY, f.id, 0, version=9),
    "truncated": lambda f: header(f.type | p.REPLY, f.id, 100) + b"abc",
    "bad-fields": lambda f: p.encode_frame(f.type | p.REPLY, f.id, b"\x01\x00\xff\xff\xff\xff"),
    "bad-int": lambda f: p.encode_frame(
        f.type | p.REPLY,
        f.id,
        p.Fields().add(p.Tag.EXIT_CODE, b"xyz").add(p.Tag.UPTIME_NS, b"xyz").encode(),
    ),
    "wrong-type": lambda f: p.encode_frame(0x55, f.id, b""),
    "error-reply": lambda f: p.encode_frame(p.MsgType.ERROR, f.id, b"\x00"),
}


@pytest.mark.parametrize("kind", sorted(REPLIES))
async def test_hostile_agent_peer_yields_agent_errors(kind: str) -> None:
    async with HostileAgent(REPLIES[kind]) as agent:
        # No wait_for: the client's own deadlines (connect's timeout, request_timeout,
        # an exec's liveness pings) must end every call.
        client = await AgentClient.connect(agent.path, BOUND, request_timeout=2.0)
        try:
            calls = (client.ping(), client.exec(["true"]), client.start_process(["true"]))
            for call in calls:
                with pytest.raises(AgentError):
                    await call
        finally:
            await client.close()


class GarbageQMPServer(FakeQMPServer):
    """The fake QMP server, answering commands (or greeting) with raw bytes."""

    def __init__(self, garbage: bytes, *, in_greeting: bool = False) -> None:
        super().__init__([Expect("query-status")])
        self.garbage = garbage
        self.in_greeting = in_greeting
        self._sent = 0

    async def _send(self, writer: asyncio.StreamWriter, msg: Mapping[str, Any]) -> None:
        self._sent += 1
        if (self.in_greeting and self._sent == 1) or (
            not self.in_greeting and "return" in msg and self._sent > 2
        ):
            writer.write(self.garbage)
            await writer.drain()
            return
        await super()._send(writer, msg)


qmp_garbage = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"{}\r\n",
            b'{"return": 1, "id": "__qmp#00001"}\r\n',
            b'{"error": "x"}\r\n',
            b'{"event": 5}\r\n',
            b"[1,2,3]\r\n",
            b'{"QMP": {}}\r\n',
            b"\xff\xfe\r\n",
            b'{"return": ' * 200 + b"\r\n",
            b'"' + b"a" * 100000,
        ]
    ),
)


@contextlib.asynccontextmanager
async def serving(server: FakeQMPServer) -> AsyncIterator[QMP]:
    qmp = QMP("fuzz")
    try:
        yield qmp
    finally:
        await qmp.close()
        await server.close()


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(qmp_garbage, st.booleans())
def test_qmp_adapter_fed_garbage(garbage: bytes, in_greeting: bool) -> None:
    async def run() -> None:
        server = GarbageQMPServer(garbage, in_greeting=in_greeting)
        sock = await server.socketpair()
        async with serving(server) as qmp:
            try:
                await asyncio.wait_for(qmp.connect(sock, timeout=0.5), BOUND)
                await asyncio.wait_for(qmp.execute("query-status", timeout=0.5), BOUND)
            except VCError:
                pass

    asyncio.run(run())
