"""ttrpc: framing, unary calls, streams, status codes, deadlines, metadata, size limits and
malformed input, between this package's client and server (and raw frames)."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator

import pytest
from google.protobuf import empty_pb2, wrappers_pb2
from hypothesis import given
from hypothesis import strategies as st

from virtcontainers.shim.proto.ttrpc import request_pb2
from virtcontainers.shim.ttrpc import (
    MAX_MESSAGE,
    CallContext,
    Client,
    Code,
    Flag,
    Header,
    MessageType,
    Server,
    ServerStream,
    Service,
    TtrpcError,
)
from virtcontainers.shim.ttrpc.framing import OversizedError, encode, read_frame

SVC = "test.v1.Echo"


def _service() -> Service:
    svc = Service(SVC)

    async def echo(ctx: CallContext, req: wrappers_pb2.StringValue) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(value=req.value)

    async def meta(ctx: CallContext, req: empty_pb2.Empty) -> wrappers_pb2.StringValue:
        items = sorted(f"{k}={','.join(v)}" for k, v in ctx.metadata.items())
        return wrappers_pb2.StringValue(value=";".join(items))

    async def sleep(ctx: CallContext, req: wrappers_pb2.DoubleValue) -> empty_pb2.Empty:
        await asyncio.sleep(req.value)
        return empty_pb2.Empty()

    async def fail(ctx: CallContext, req: wrappers_pb2.StringValue) -> empty_pb2.Empty:
        if req.value == "notfound":
            raise TtrpcError(Code.NOT_FOUND, "container x: not found")
        raise RuntimeError("boom")

    async def big(ctx: CallContext, req: wrappers_pb2.Int64Value) -> wrappers_pb2.BytesValue:
        return wrappers_pb2.BytesValue(value=b"x" * req.value)

    async def deadline(ctx: CallContext, req: empty_pb2.Empty) -> wrappers_pb2.DoubleValue:
        left = -1.0 if ctx.deadline is None else ctx.deadline - asyncio.get_running_loop().time()
        return wrappers_pb2.DoubleValue(value=left)

    async def count(
        ctx: CallContext, stream: ServerStream[wrappers_pb2.Int64Value]
    ) -> wrappers_pb2.Int64Value:
        first = await stream.recv()
        assert first is not None
        for i in range(first.value):
            await stream.send(wrappers_pb2.Int64Value(value=i))
        return wrappers_pb2.Int64Value()

    async def total(
        ctx: CallContext, stream: ServerStream[wrappers_pb2.Int64Value]
    ) -> wrappers_pb2.Int64Value:
        n = 0
        while (msg := await stream.recv()) is not None:
            n += msg.value
            await stream.send(wrappers_pb2.Int64Value(value=n))
        return wrappers_pb2.Int64Value(value=n)

    svc.unary("Echo", wrappers_pb2.StringValue, echo)
    svc.unary("Meta", empty_pb2.Empty, meta)
    svc.unary("Sleep", wrappers_pb2.DoubleValue, sleep)
    svc.unary("Fail", wrappers_pb2.StringValue, fail)
    svc.unary("Big", wrappers_pb2.Int64Value, big)
    svc.unary("Deadline", empty_pb2.Empty, deadline)
    svc.stream("Count", wrappers_pb2.Int64Value, count)
    svc.stream("Total", wrappers_pb2.Int64Value, total)
    return svc


@pytest.fixture
async def served(tmp_path: object) -> AsyncIterator[tuple[Server, str]]:
    path = os.path.join(str(tmp_path), "t.sock")
    server = Server([_service()])
    await server.listen(path)
    yield server, path
    await server.close()


@pytest.fixture
async def client(served: tuple[Server, str]) -> AsyncIterator[Client]:
    c = await Client.connect(served[1])
    yield c
    await c.close()


# --- framing ---------------------------------------------------------------------------------


def test_header_layout_is_big_endian_10_bytes() -> None:
    frame = encode(5, MessageType.REQUEST, b"abc", Flag.REMOTE_OPEN)
    assert frame[:10] == bytes([0, 0, 0, 3, 0, 0, 0, 5, 1, 2])
    assert frame[10:] == b"abc"


@given(
    length=st.integers(0, 2**32 - 1),
    stream_id=st.integers(0, 2**32 - 1),
    type_=st.integers(0, 255),
    flags=st.integers(0, 255),
)
def test_header_round_trips(length: int, stream_id: int, type_: int, flags: int) -> None:
    h = Header(length, stream_id, type_, flags)
    packed = h.pack()
    assert len(packed) == 10
    assert packed == struct.pack(">IIBB", length, stream_id, type_, flags)
    assert Header.unpack(packed) == h


@given(
    frames=st.lists(
        st.tuples(
            st.integers(1, 2**31), st.sampled_from(list(MessageType)), st.binary(max_size=300)
        ),
        max_size=8,
    ),
    chunk=st.integers(1, 64),
)
async def test_frames_read_back_from_any_chunking(
    frames: list[tuple[int, int, bytes]], chunk: int
) -> None:
    wire = b"".join(encode(sid, t, data) for sid, t, data in frames)
    reader = asyncio.StreamReader()
    for i in range(0, len(wire), chunk):
        reader.feed_data(wire[i : i + chunk])
    reader.feed_eof()
    got = [await read_frame(reader) for _ in frames]
    assert [(h.stream_id, h.type, d) for h, d in got] == frames
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(reader)


async def test_oversized_frame_is_skipped_and_the_next_one_read() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(Header(MAX_MESSAGE + 1, 7, MessageType.REQUEST).pack())
    reader.feed_data(b"\0" * (MAX_MESSAGE + 1))
    reader.feed_data(encode(9, MessageType.REQUEST, b"next"))
    with pytest.raises(OversizedError, match="exceeds maximum message size") as info:
        await read_frame(reader)
    assert info.value.header.stream_id == 7
    header, data = await read_frame(reader)
    assert (header.stream_id, data) == (9, b"next")


def test_encode_refuses_oversized_data() -> None:
    with pytest.raises(ValueError, match="exceeds the maximum"):
        encode(1, MessageType.REQUEST, b"x" * (MAX_MESSAGE + 1))


# --- calls -----------------------------------------------------------------------------------


async def test_unary_round_trip_and_concurrency(client: Client) -> None:
    async def one(i: int) -> str:
        req = wrappers_pb2.StringValue(value=f"v{i}")
        resp = await client.call(SVC, "Echo", req, wrappers_pb2.StringValue)
        return resp.value

    assert await asyncio.gather(*(one(i) for i in range(50))) == [f"v{i}" for i in range(50)]


async def test_slow_call_does_not_block_others(client: Client) -> None:
    slow = asyncio.ensure_future(
        client.call(SVC, "Sleep", wrappers_pb2.DoubleValue(value=0.5), empty_pb2.Empty)
    )
    fast = await client.call(
        SVC, "Echo", wrappers_pb2.StringValue(value="a"), wrappers_pb2.StringValue
    )
    assert fast.value == "a"
    assert not slow.done()
    await slow


async def test_unknown_service_and_method_are_unimplemented(client: Client) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call("no.such.Service", "Echo", empty_pb2.Empty(), empty_pb2.Empty)
    assert info.value.code == Code.UNIMPLEMENTED
    assert "service no.such.Service" in info.value.message
    with pytest.raises(TtrpcError) as info:
        await client.call(SVC, "Nope", empty_pb2.Empty(), empty_pb2.Empty)
    assert info.value.code == Code.UNIMPLEMENTED
    assert info.value.message == "method Nope"
    # The connection keeps serving.
    resp = await client.call(
        SVC, "Echo", wrappers_pb2.StringValue(value="ok"), wrappers_pb2.StringValue
    )
    assert resp.value == "ok"


async def test_handler_errors_carry_their_status(client: Client) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(SVC, "Fail", wrappers_pb2.StringValue(value="notfound"), empty_pb2.Empty)
    assert (info.value.code, info.value.message) == (Code.NOT_FOUND, "container x: not found")
    with pytest.raises(TtrpcError) as info:
        await client.call(SVC, "Fail", wrappers_pb2.StringValue(value="other"), empty_pb2.Empty)
    assert (info.value.code, info.value.message) == (Code.UNKNOWN, "boom")


async def test_bad_payload_is_an_error_status(client: Client) -> None:
    # Field 1 of StringValue is a string: invalid UTF-8 fails to decode.
    with pytest.raises(TtrpcError) as info:
        await client.call(
            SVC, "Echo", wrappers_pb2.BytesValue(value=b"\xff\xfe"), wrappers_pb2.StringValue
        )
    assert info.value.code == Code.INTERNAL
    assert "StringValue" in info.value.message


async def test_metadata_reaches_the_handler(client: Client) -> None:
    resp = await client.call(
        SVC,
        "Meta",
        empty_pb2.Empty(),
        wrappers_pb2.StringValue,
        metadata={"b": ["1", "2"], "a": "x"},
    )
    assert resp.value == "a=x;b=1,2"


async def test_deadline_is_sent_and_enforced_by_the_server(served: tuple[Server, str]) -> None:
    async with await Client.connect(served[1]) as c:
        left = await c.call(SVC, "Deadline", empty_pb2.Empty(), wrappers_pb2.DoubleValue, timeout=5)
        assert 4 < left.value <= 5
        none = await c.call(SVC, "Deadline", empty_pb2.Empty(), wrappers_pb2.DoubleValue)
        assert none.value == -1
    # A raw request with a 50 ms timeout_nano, waited for without a client-side timeout: the
    # server answers DEADLINE_EXCEEDED itself.
    reader, writer = await asyncio.open_unix_connection(served[1])
    req = request_pb2.Request(
        service=SVC,
        method="Sleep",
        payload=wrappers_pb2.DoubleValue(value=10).SerializeToString(),
        timeout_nano=50_000_000,
    )
    writer.write(encode(1, MessageType.REQUEST, req.SerializeToString()))
    header, data = await asyncio.wait_for(read_frame(reader), 5)
    resp = request_pb2.Response.FromString(data)
    assert (header.stream_id, header.type) == (1, MessageType.RESPONSE)
    assert resp.status.code == Code.DEADLINE_EXCEEDED
    writer.close()
    await writer.wait_closed()


async def test_client_timeout_raises_deadline_exceeded(client: Client) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(
            SVC, "Sleep", wrappers_pb2.DoubleValue(value=5), empty_pb2.Empty, timeout=0.05
        )
    assert info.value.code == Code.DEADLINE_EXCEEDED


async def test_big_responses_up_to_the_limit(client: Client) -> None:
    ok = await client.call(
        SVC, "Big", wrappers_pb2.Int64Value(value=MAX_MESSAGE - 100), wrappers_pb2.BytesValue
    )
    assert len(ok.value) == MAX_MESSAGE - 100
    # A response over the limit becomes a RESOURCE_EXHAUSTED status.
    with pytest.raises(TtrpcError) as info:
        await client.call(
            SVC, "Big", wrappers_pb2.Int64Value(value=MAX_MESSAGE), wrappers_pb2.BytesValue
        )
    assert info.value.code == Code.RESOURCE_EXHAUSTED


async def test_client_refuses_oversized_request(client: Client) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(
            SVC, "Echo", wrappers_pb2.StringValue(value="x" * MAX_MESSAGE), wrappers_pb2.StringValue
        )
    assert info.value.code == Code.RESOURCE_EXHAUSTED


# --- raw frames: what a misbehaving peer sends ------------------------------------------------


async def _raw(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


async def _answer(reader: asyncio.StreamReader) -> tuple[int, request_pb2.Response]:
    header, data = await asyncio.wait_for(read_frame(reader), 5)
    assert header.type == MessageType.RESPONSE
    return header.stream_id, request_pb2.Response.FromString(data)


def _echo_request(value: str) -> bytes:
    payload = wrappers_pb2.StringValue(value=value).SerializeToString()
    return request_pb2.Request(service=SVC, method="Echo", payload=payload).SerializeToString()


async def test_server_answers_oversized_frame_and_keeps_serving(served: tuple[Server, str]) -> None:
    reader, writer = await _raw(served[1])
    writer.write(Header(MAX_MESSAGE + 10, 3, MessageType.REQUEST).pack())
    writer.write(b"\0" * (MAX_MESSAGE + 10))
    writer.write(encode(5, MessageType.REQUEST, _echo_request("after")))
    sid, resp = await _answer(reader)
    assert sid == 3
    assert resp.status.code == Code.RESOURCE_EXHAUSTED
    assert f"exceeds maximum message size of {MAX_MESSAGE}" in resp.status.message
    sid, resp = await _answer(reader)
    assert sid == 5
    assert wrappers_pb2.StringValue.FromString(resp.payload).value == "after"
    writer.close()
    await writer.wait_closed()


async def test_server_rejects_even_stream_ids_and_garbage(served: tuple[Server, str]) -> None:
    reader, writer = await _raw(served[1])
    writer.write(encode(2, MessageType.REQUEST, _echo_request("x")))
    sid, resp = await _answer(reader)
    assert (sid, resp.status.code) == (2, Code.INVALID_ARGUMENT)
    assert "odd" in resp.status.message
    writer.write(encode(7, MessageType.REQUEST, b"\xff\xff\xff"))
    sid, resp = await _answer(reader)
    assert (sid, resp.status.code) == (7, Code.INVALID_ARGUMENT)
    assert "unmarshal request" in resp.status.message
    # Unknown message types are ignored; the next request is answered.
    writer.write(encode(9, 0x7F, b"whatever"))
    writer.write(encode(11, MessageType.REQUEST, _echo_request("y")))
    sid, resp = await _answer(reader)
    assert sid == 11
    assert resp.status.code == Code.OK
    writer.close()
    await writer.wait_closed()


async def test_connection_cut_mid_frame_leaves_server_serving(served: tuple[Server, str]) -> None:
    _reader, writer = await _raw(served[1])
    writer.write(encode(1, MessageType.REQUEST, _echo_request("z"))[:7])
    writer.close()
    await writer.wait_closed()
    async with await Client.connect(served[1]) as c:
        resp = await c.call(
            SVC, "Echo", wrappers_pb2.StringValue(value="z"), wrappers_pb2.StringValue
        )
        assert resp.value == "z"


async def test_client_sees_server_close(served: tuple[Server, str]) -> None:
    server, path = served
    c = await Client.connect(path)
    pending = asyncio.ensure_future(
        c.call(SVC, "Sleep", wrappers_pb2.DoubleValue(value=10), empty_pb2.Empty)
    )
    await asyncio.sleep(0.1)
    await server.close()
    with pytest.raises(TtrpcError) as info:
        await asyncio.wait_for(pending, 5)
    assert info.value.code == Code.UNAVAILABLE
    await c.close()


# --- streams ---------------------------------------------------------------------------------


async def test_server_stream(client: Client) -> None:
    stream = await client.stream(SVC, "Count", wrappers_pb2.Int64Value(value=4))
    got = []
    while (msg := await stream.recv(wrappers_pb2.Int64Value)) is not None:
        got.append(msg.value)
    assert got == [0, 1, 2, 3]


async def test_bidirectional_stream(client: Client) -> None:
    stream = await client.stream(SVC, "Total", client_streaming=True)
    sums = []
    for v in (1, 2, 3):
        await stream.send(wrappers_pb2.Int64Value(value=v))
        msg = await stream.recv(wrappers_pb2.Int64Value)
        assert msg is not None
        sums.append(msg.value)
    await stream.close_send()
    assert await stream.recv(wrappers_pb2.Int64Value) is None
    assert sums == [1, 3, 6]


async def test_streaming_method_called_unary_and_vice_versa(client: Client) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(SVC, "Count", wrappers_pb2.Int64Value(value=1), wrappers_pb2.Int64Value)
    assert info.value.code == Code.INVALID_ARGUMENT
    stream = await client.stream(SVC, "Echo", wrappers_pb2.StringValue(value="x"))
    with pytest.raises(TtrpcError) as info:
        await stream.recv(wrappers_pb2.StringValue)
    assert info.value.code == Code.INVALID_ARGUMENT


def test_duplicate_service_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        Server([Service("a"), Service("a")])
