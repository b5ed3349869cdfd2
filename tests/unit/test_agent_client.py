"""AgentClient against an in-process fake agent and fake hybrid vsock sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import pytest

from virtcontainers.agent import (
    AgentClient,
    AgentRequestError,
    AgentTimeoutError,
    ExecResult,
    HybridVsock,
    VsockAddress,
)
from virtcontainers.agent import protocol as p
from virtcontainers.agent.fake import ExecRequest, FakeAgent
from virtcontainers.errors import AgentError


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vc-agent-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def agent(sockdir: str) -> AsyncIterator[FakeAgent]:
    async with FakeAgent(os.path.join(sockdir, "agent.sock")) as fake:
        yield fake


@pytest.fixture
async def client(agent: FakeAgent) -> AsyncIterator[AgentClient]:
    async with await AgentClient.connect(agent.path, 5) as c:
        yield c


async def test_ping_and_hello(client: AgentClient, agent: FakeAgent) -> None:
    info = await client.ping()
    assert info.version == agent.version == client.agent_version
    assert info.uptime >= 0
    assert [f.type for f in agent.requests] == [p.MsgType.HELLO, p.MsgType.PING]


async def test_exec_result_and_request_fields(client: AgentClient, agent: FakeAgent) -> None:
    seen: list[ExecRequest] = []

    async def handler(req: ExecRequest) -> ExecResult:
        seen.append(req)
        return ExecResult(3, b"\x00out\xff", b"err", signal=0)

    agent.exec_handler = handler
    res = await client.exec(
        ["prog", "a b", ""], stdin=b"\x00in", env={"K": "v=w"}, cwd="/x", timeout=2.5
    )
    assert res == ExecResult(3, b"\x00out\xff", b"err")
    assert not res.ok
    assert seen[0] == ExecRequest(["prog", "a b", ""], {"K": "v=w"}, "/x", b"\x00in", 2.5)


async def test_exec_error_reply_raises_with_errno(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError, match="ENOENT") as info:
        await client.exec(["no-such-command"])
    assert info.value.errno == 2


@pytest.mark.parametrize(
    ("argv", "kwargs", "match"),
    [
        ("ls -l", {}, "sequence"),
        ([], {}, "non-empty"),
        (["a\0b"], {}, "NUL"),
        (["a"], {"env": {"A=B": "c"}}, "environment"),
        (["a"], {"timeout": 0}, "timeout"),
        (["a"], {"max_output": -1}, "max_output"),
    ],
)
async def test_exec_bad_arguments(
    client: AgentClient, argv: object, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(AgentError, match=match):
        await client.exec(argv, **kwargs)  # type: ignore[arg-type]


async def test_concurrent_execs_are_in_flight_together(
    client: AgentClient, agent: FakeAgent
) -> None:
    active = 0
    peak = 0
    release = asyncio.Event()

    async def handler(req: ExecRequest) -> ExecResult:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if peak == 10:
            release.set()
        await release.wait()
        active -= 1
        return ExecResult(0, req.argv[1].encode(), b"")

    agent.exec_handler = handler
    results = await asyncio.gather(*(client.exec(["echo", str(i)]) for i in range(10)))
    assert [r.stdout for r in results] == [str(i).encode() for i in range(10)]
    assert peak == 10


async def test_dead_connection_fails_every_pending_request(
    client: AgentClient, agent: FakeAgent
) -> None:
    started = asyncio.Event()

    async def handler(req: ExecRequest) -> ExecResult:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    agent.exec_handler = handler
    pending = [asyncio.create_task(client.exec(["sleep"])) for _ in range(3)]
    await started.wait()
    await agent.drop_connections()
    for task in pending:
        with pytest.raises(AgentError, match="closed"):
            await asyncio.wait_for(task, 5)
    assert client.closed
    with pytest.raises(AgentError):
        await client.ping()


async def test_exec_timeout_is_reported(client: AgentClient) -> None:
    res = await client.exec(["sleep", "30"], timeout=0.05)
    assert res.timed_out and res.signal == 9 and res.exit_code == -1


@pytest.mark.parametrize(
    ("start", "kind"),
    [
        (lambda c: c.exec(["sleep", "3600"]), p.MsgType.EXEC),
        (lambda c: c.wait_hardware(block_serial="never", timeout=60), p.MsgType.WAIT),
    ],
    ids=["exec", "wait"],
)
async def test_cancelled_request_sends_cancel(
    client: AgentClient,
    agent: FakeAgent,
    start: Callable[[AgentClient], Coroutine[Any, Any, Any]],
    kind: p.MsgType,
) -> None:
    task = asyncio.create_task(start(client))
    while not any(f.type == kind for f in agent.requests):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if any(f.type == p.MsgType.CANCEL for f in agent.requests):
            break
        await asyncio.sleep(0.01)
    cancel = next(f for f in agent.requests if f.type == p.MsgType.CANCEL)
    request_id = next(f.id for f in agent.requests if f.type == kind)
    assert p.Fields.decode(cancel.payload).int_(p.Tag.TARGET) == request_id
    assert (await client.ping()).version  # connection still usable


async def test_files_time_entropy(client: AgentClient, agent: FakeAgent) -> None:
    await client.write_file("/etc/x", b"\x00\x01", 0o600)
    assert agent.files["/etc/x"] == (b"\x00\x01", 0o600)
    assert await client.read_file("/etc/x") == b"\x00\x01"
    with pytest.raises(AgentRequestError):
        await client.read_file("/missing")
    with pytest.raises(AgentError, match="path"):
        await client.read_file("")
    await client.set_time(1234.5)
    assert agent.clock_set == [1234.5]
    await client.add_entropy(b"seed")
    await client.add_entropy()
    assert agent.entropy[0] == b"seed" and len(agent.entropy[1]) == 64
    assert await client.online() == (0, 0)


async def test_connect_waits_for_a_late_agent(sockdir: str) -> None:
    path = os.path.join(sockdir, "late.sock")
    fake = FakeAgent(path)

    async def start_late() -> None:
        await asyncio.sleep(0.3)
        await fake.start()

    starter = asyncio.create_task(start_late())
    try:
        async with await AgentClient.connect(path, 10) as c:
            assert (await c.ping()).version == fake.version
    finally:
        await starter
        await fake.stop()


async def test_connect_gives_up_at_the_deadline(sockdir: str) -> None:
    path = os.path.join(sockdir, "nobody.sock")
    with pytest.raises(AgentTimeoutError, match=r"nobody\.sock"):
        await AgentClient.connect(path, 0.3)


async def test_hello_skips_garbage_and_stale_replies(sockdir: str) -> None:
    path = os.path.join(sockdir, "stale.sock")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = p.FrameDecoder()
        while data := await reader.read(4096):
            for frame in dec.feed(data):
                stale = p.Fields().add(p.Tag.NONCE, b"oldnonce").add(p.Tag.VERSION, "old")
                writer.write(b"\xffgarbage VCAG\x00\x01")
                writer.write(p.encode_frame(p.MsgType.HELLO | p.REPLY, frame.id, stale.encode()))
                writer.write(p.encode_frame(p.MsgType.EXEC | p.REPLY, 1, b""))
                f = p.Fields.decode(frame.payload)
                if frame.type == p.MsgType.HELLO:
                    good = p.Fields().add(p.Tag.NONCE, f.bytes_(p.Tag.NONCE))
                    good.add(p.Tag.VERSION, "new")
                    writer.write(p.encode_frame(frame.type | p.REPLY, frame.id, good.encode()))
        writer.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        c = await AgentClient.connect(path, 5)
        assert c.agent_version == "new"
        await c.close()
        await c.close()  # idempotent
    finally:
        server.close()


@pytest.mark.parametrize("booting", [False, True])
async def test_a_booting_vm_keeps_its_first_connection(
    sockdir: str, monkeypatch: pytest.MonkeyPatch, booting: bool
) -> None:
    """An agent that answers later than a hello's retry window (a TCG boot): a client that
    may reconnect does; one told the VM is booting keeps the connection it made, so an agent
    starting during a reconnect's pause is not left waiting it out."""
    from virtcontainers.agent import client as client_mod

    monkeypatch.setattr(client_mod, "HELLO_RETRY", (0.05,))
    monkeypatch.setattr(client_mod, "RECONNECT_PAUSE", (0.01,))
    path = os.path.join(sockdir, "late.sock")
    connections: list[float] = []
    loop = asyncio.get_running_loop()
    answer_at = loop.time() + 0.4

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(loop.time())
        dec = p.FrameDecoder()
        while data := await reader.read(4096):
            for frame in dec.feed(data):
                await asyncio.sleep(max(0.0, answer_at - loop.time()))  # the agent starts
                f = p.Fields.decode(frame.payload)
                good = p.Fields().add(p.Tag.NONCE, f.bytes_(p.Tag.NONCE)).add(p.Tag.VERSION, "v")
                writer.write(p.encode_frame(frame.type | p.REPLY, frame.id, good.encode()))
        writer.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        c = await AgentClient.connect(path, 5, booting=booting)
        await c.close()
    finally:
        server.close()
    assert len(connections) == 1 if booting else len(connections) > 1


# -- hybrid vsock ------------------------------------------------------------------------------


async def test_hybrid_vsock_ok(sockdir: str) -> None:
    uds = os.path.join(sockdir, "hv.sock")
    async with (
        FakeAgent(uds, hybrid_port=1024) as fake,
        await AgentClient.connect(HybridVsock(uds, 1024), 5) as c,
    ):
        assert (await c.ping()).version == fake.version
        assert "hybrid vsock" in c.target


@contextlib.asynccontextmanager
async def _uds_server(path: str, behaviour: str) -> AsyncIterator[list[bytes]]:
    lines: list[bytes] = []
    hold: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines.append(await reader.readline())
        if behaviour == "refuse":
            writer.close()
        elif behaviour == "garbage" or (behaviour == "garbage, then hang" and len(lines) == 1):
            writer.write(b"ERR no listener\n")
            writer.close()
        else:
            hold.append(writer)  # "hang": never answer

    server = await asyncio.start_unix_server(serve, path)
    try:
        yield lines
    finally:
        server.close()
        for w in hold:
            w.close()


@pytest.mark.parametrize("behaviour", ["refuse", "garbage", "hang"])
async def test_hybrid_vsock_failures_end_in_a_clear_error(sockdir: str, behaviour: str) -> None:
    uds = os.path.join(sockdir, "hv.sock")
    async with _uds_server(uds, behaviour) as lines:
        with pytest.raises(AgentError, match="CONNECT") as info:
            await AgentClient.connect(HybridVsock(uds, 2000), 0.5)
    assert lines and lines[0] == b"CONNECT 2000\n"
    assert "hv.sock" in str(info.value)


async def test_an_attempt_cut_by_the_deadline_does_not_hide_the_refusal_before_it(
    sockdir: str,
) -> None:
    """The last attempt, cut short by the deadline, says only that time ran out: the error
    names what the attempt before it was told."""
    uds = os.path.join(sockdir, "hv.sock")
    async with _uds_server(uds, "garbage, then hang") as lines:
        with pytest.raises(AgentError, match="CONNECT refused: 'ERR no listener'"):
            await AgentClient.connect(HybridVsock(uds, 2000), 0.5)
    assert len(lines) == 2


async def test_hybrid_vsock_port_out_of_range() -> None:
    with pytest.raises(AgentError, match="port"):
        await AgentClient.connect(HybridVsock("/nonexistent", 0), 1)


async def test_vsock_target_validation_and_unreachable_cid() -> None:
    with pytest.raises(AgentError, match="CIDs"):
        await AgentClient.connect(VsockAddress(2, 1024), 1)
    with pytest.raises(AgentError, match="port"):
        await AgentClient.connect(VsockAddress(3, 0), 1)
    # No guest has CID 4000000000 here: the client keeps retrying, then names the target.
    with pytest.raises(AgentTimeoutError, match="vsock cid 4000000000 port 1024"):
        await AgentClient.connect(VsockAddress(4_000_000_000), 0.3)


async def test_a_guest_field_bomb_fails_one_request_and_stalls_nothing(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A full-size frame of empty fields, as an id-0 notice and as a reply: the reader looks
    at a few fields of the notice only; the reply fails its own request with a clear error;
    the connection keeps serving."""
    path = os.path.join(sockdir, "bomb.sock")
    bomb = b"\x00" * (p.MAX_FRAME // 6 * 6)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = p.FrameDecoder()
        while data := await reader.read(1 << 16):
            for frame in dec.feed(data):
                reply = frame.type | p.REPLY
                if frame.type == p.MsgType.HELLO:
                    f = p.Fields.decode(frame.payload)
                    out = p.Fields().add(p.Tag.NONCE, f.bytes_(p.Tag.NONCE)).encode()
                elif frame.type == p.MsgType.READ_FILE:
                    writer.write(p.encode_frame(p.MsgType.ERROR, 0, bomb))
                    out = bomb
                else:
                    out = p.Fields().add(p.Tag.VERSION, "v").encode()
                writer.write(p.encode_frame(reply, frame.id, out))
                await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        async with await AgentClient.connect(path, 5) as c:
            with pytest.raises(p.ProtocolError, match=f"more than {p.MAX_FIELDS} fields"):
                await c.read_file("/x")
            assert (await c.ping()).version == "v"
            assert not c.closed
        assert "unreadable notice (payload holds more than 8 fields)" in caplog.text
    finally:
        server.close()


async def test_started_process_on_the_fake_agent(client: AgentClient, agent: FakeAgent) -> None:
    """The fake serves the process model too (for the mock driver and unit tests)."""
    proc = await client.start_process(["echo", "hi"], env={"A": "b"})
    assert await proc.stdout.read() == b"hi\n"
    assert (await proc.wait()).ok
    proc = await client.start_process(["sleep", "100"], tty=True)
    await proc.write_stdin(b"typed")
    await proc.resize(10, 20)
    await proc.signal(15)
    status = await proc.wait()
    assert (status.exit_code, status.signal) == (-1, 15)
    assert agent.stdin_seen[proc.handle] == b"typed"
    assert agent.resizes == [(proc.handle, 10, 20)]
    with pytest.raises(AgentRequestError, match="ESRCH"):
        await client.attach_process(proc.handle)


async def test_process_streams_end_with_an_error_when_the_connection_dies(
    client: AgentClient, agent: FakeAgent
) -> None:
    proc = await client.start_process(["sleep", "100"])
    await agent.drop_connections()
    with pytest.raises(AgentError, match="closed"):
        await proc.stdout.read()
    with pytest.raises(AgentError, match="closed"):
        await proc.wait()


async def test_output_nobody_reads_is_bounded_on_the_host(
    client: AgentClient, agent: FakeAgent
) -> None:
    """A guest flooding a stream the caller does not read: the host keeps at most
    MAX_BUFFER bytes of it and counts the rest as dropped."""
    from virtcontainers.agent.process import MAX_BUFFER

    async def flood(req: ExecRequest) -> ExecResult:
        return ExecResult(0, b"x" * (MAX_BUFFER // 2), b"")

    agent.exec_handler = flood
    procs = [await client.start_process(["flood"]) for _ in range(3)]
    for proc in procs:
        await proc.wait()
    kept = [len(await proc.stdout.read()) for proc in procs]
    assert kept == [MAX_BUFFER // 2] * 3  # each stream is bounded on its own
    big = ExecResult(0, b"y" * (MAX_BUFFER + 1), b"")

    async def flood_more(req: ExecRequest) -> ExecResult:
        return big

    agent.exec_handler = flood_more
    proc = await client.start_process(["flood"])
    await proc.wait()
    assert await proc.stdout.read() == b""
    assert proc.stdout.dropped == MAX_BUFFER + 1
