"""ttrpc interop: this package's client against containerd's own ttrpc server (Go ttrpc 1.1, the
events service at containerd's [ttrpc].address), checked through `ctr events`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from containerd_support import CONTAINERD, CTR, NAMESPACE, Containerd, running_containerd
from google.protobuf import empty_pb2

from virtcontainers.shim.events import EVENTS_SERVICE, Publisher, now, pack
from virtcontainers.shim.proto.containerd.api.events import task_pb2 as events
from virtcontainers.shim.proto.containerd.api.services.ttrpc.events.v1 import events_pb2
from virtcontainers.shim.proto.ttrpc import request_pb2
from virtcontainers.shim.ttrpc import MAX_MESSAGE, Client, Code, Header, MessageType, TtrpcError
from virtcontainers.shim.ttrpc.framing import encode, read_frame

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    with running_containerd() as c:
        yield c


class EventWatch:
    """`ctr events` running in the background; lines collected as they come."""

    def __init__(self, c: Containerd) -> None:
        self.proc = subprocess.Popen(
            [CTR, "-a", c.address, "events"], stdout=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []

    async def wait_for(self, marker: str, resend: object, timeout: float = 15) -> str:
        """Wait for a line containing `marker`, calling `resend()` until one comes (the
        subscription starts asynchronously)."""
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            await resend()  # type: ignore[operator]
            for _ in range(10):
                line = self.proc.stdout.readline()
                while line:
                    self.lines.append(line)
                    if marker in line:
                        return line
                    line = self.proc.stdout.readline()
                await asyncio.sleep(0.05)
        raise AssertionError(f"no event with {marker!r}; saw {self.lines}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def _forward_request(container_id: str) -> events_pb2.ForwardRequest:
    env = events_pb2.Envelope(
        timestamp=now(),
        namespace=NAMESPACE,
        topic="/tasks/oom",
        event=pack(events.TaskOOM(container_id=container_id)),
    )
    return events_pb2.ForwardRequest(envelope=env)


async def test_forward_reaches_containerd_subscribers(containerd: Containerd) -> None:
    cid = f"oom-{uuid.uuid4().hex[:6]}"
    watch = EventWatch(containerd)
    try:
        async with await Client.connect(containerd.ttrpc_address) as client:

            async def send() -> None:
                await client.call(
                    EVENTS_SERVICE,
                    "Forward",
                    _forward_request(cid),
                    empty_pb2.Empty,
                    timeout=5,
                    metadata={"x-test": "1"},
                )

            line = await watch.wait_for(cid, send)
    finally:
        watch.stop()
    # ctr decoded the Any by its type URL: the JSON of the event is printed.
    assert NAMESPACE in line
    assert "/tasks/oom" in line
    assert f'"container_id":"{cid}"' in line.replace(" ", "")


async def test_go_server_status_errors_and_size_limit(containerd: Containerd) -> None:
    async with await Client.connect(containerd.ttrpc_address) as client:
        with pytest.raises(TtrpcError) as info:
            await client.call("no.such.Service", "Forward", empty_pb2.Empty(), empty_pb2.Empty)
        assert info.value.code == Code.UNIMPLEMENTED
        assert "no.such.Service" in info.value.message
        with pytest.raises(TtrpcError) as info:
            await client.call(EVENTS_SERVICE, "Nope", empty_pb2.Empty(), empty_pb2.Empty)
        assert info.value.code == Code.UNIMPLEMENTED
        assert "Nope" in info.value.message
        # Deadlines are carried: a call with a timeout is answered within it.
        await client.call(
            EVENTS_SERVICE, "Forward", _forward_request("dl"), empty_pb2.Empty, timeout=5
        )

    # An oversized frame: containerd answers RESOURCE_EXHAUSTED on that stream and serves the
    # next request on the same connection.
    reader, writer = await asyncio.open_unix_connection(containerd.ttrpc_address)
    try:
        writer.write(Header(MAX_MESSAGE + 1, 1, MessageType.REQUEST).pack())
        writer.write(b"\0" * (MAX_MESSAGE + 1))
        req = request_pb2.Request(
            service=EVENTS_SERVICE,
            method="Forward",
            payload=_forward_request("after").SerializeToString(),
        )
        writer.write(encode(3, MessageType.REQUEST, req.SerializeToString()))
        await writer.drain()
        answers = {}
        for _ in range(2):
            header, data = await asyncio.wait_for(read_frame(reader), 10)
            answers[header.stream_id] = request_pb2.Response.FromString(data)
        assert answers[1].status.code == Code.RESOURCE_EXHAUSTED
        assert "exceed maximum message size" in answers[1].status.message
        assert answers[3].status.code == Code.OK
    finally:
        writer.close()
        await writer.wait_closed()


async def test_publisher_falls_back_to_the_publish_binary(containerd: Containerd) -> None:
    cid = f"bin-{uuid.uuid4().hex[:6]}"
    publisher = Publisher(
        NAMESPACE,
        ttrpc_address=os.path.join(containerd.dir, "nothing-here.sock"),
        publish_binary=CONTAINERD,
        containerd_address=containerd.address,
        attempts=1,
    )
    watch = EventWatch(containerd)
    try:

        async def send() -> None:
            publisher.publish(events.TaskPaused(container_id=cid))
            await asyncio.sleep(0.2)

        line = await watch.wait_for(cid, send)
    finally:
        watch.stop()
        await publisher.close()
    assert "/tasks/paused" in line
