"""The QMP adapter against the scripted fake QMP server."""

from __future__ import annotations

import asyncio
import os

import pytest

from fakes.qmp_server import Event, Expect, FakeQMPServer, Hangup
from virtcontainers.drivers.qemu.qmp import QMP, QMPCommandError, QMPDisconnectedError
from virtcontainers.errors import VMTimeoutError


async def connect(server: FakeQMPServer) -> QMP:
    qmp = QMP("t")
    await qmp.connect(await server.socketpair(), timeout=5)
    return qmp


async def test_execute_returns_reply_and_sends_arguments() -> None:
    server = FakeQMPServer(
        [
            Expect("query-status", reply={"status": "running", "running": True}),
            Expect("stop", arguments={}),
            Expect("object-add", arguments={"qom-type": "x", "id": "y"}),
        ]
    )
    qmp = await connect(server)
    assert (await qmp.execute("query-status"))["status"] == "running"
    assert await qmp.execute("stop") == {}
    await qmp.execute("object-add", {"qom-type": "x", "id": "y"})
    await qmp.close()
    await server.close()
    server.assert_done()
    assert server.commands == ["query-status", "stop", "object-add"]


async def test_error_reply_becomes_command_error() -> None:
    server = FakeQMPServer([Expect("device_del", error=("DeviceNotFound", "Device 'x' not found"))])
    qmp = await connect(server)
    with pytest.raises(QMPCommandError) as exc:
        await qmp.execute("device_del", {"id": "x"})
    assert exc.value.error_class == "DeviceNotFound"
    assert "device_del" in str(exc.value) and "not found" in str(exc.value)
    await qmp.close()
    await server.close()
    server.assert_done()


async def test_event_after_command_is_seen_when_listening_first() -> None:
    server = FakeQMPServer(
        [
            Expect(
                "device_del",
                events=[
                    {"event": "DEVICE_DELETED", "data": {"device": "other"}},
                    {"event": "DEVICE_DELETED", "data": {"device": "blk0"}},
                ],
            )
        ]
    )
    qmp = await connect(server)
    with qmp.events("DEVICE_DELETED") as events:
        await qmp.execute("device_del", {"id": "blk0"})
        ev = await events.wait(lambda e: e["data"]["device"] == "blk0", timeout=5)
    assert ev["data"]["device"] == "blk0"
    await qmp.close()
    await server.close()


async def test_event_wait_times_out_clearly() -> None:
    server = FakeQMPServer([Event("STOP")])
    qmp = await connect(server)
    with (
        qmp.events("DEVICE_DELETED") as events,
        pytest.raises(VMTimeoutError, match="DEVICE_DELETED"),
    ):
        await events.wait(timeout=0.2)
    await qmp.close()
    await server.close()


async def test_unexpected_command_fails_the_script() -> None:
    server = FakeQMPServer([Expect("stop")])
    qmp = await connect(server)
    with pytest.raises(QMPCommandError):
        await qmp.execute("cont")
    await qmp.close()
    await server.close()
    with pytest.raises(AssertionError, match="unexpected command 'cont' \\(expected stop\\)"):
        server.assert_done()


async def test_wrong_arguments_fail_the_script() -> None:
    server = FakeQMPServer([Expect("migrate", arguments={"uri": "exec:cat>/a"})])
    qmp = await connect(server)
    await qmp.execute("migrate", {"uri": "exec:cat>/b"})
    await qmp.close()
    await server.close()
    with pytest.raises(AssertionError, match="differ from expected"):
        server.assert_done()


async def test_hangup_after_greeting_is_a_disconnect() -> None:
    server = FakeQMPServer([Hangup()])
    qmp = QMP("t")
    with pytest.raises(QMPDisconnectedError):
        await qmp.connect(await server.socketpair(), timeout=5)
    await server.close()


async def test_hangup_during_command_is_a_disconnect() -> None:
    server = FakeQMPServer([Expect("quit", no_reply=True, hangup=True)])
    qmp = await connect(server)
    with pytest.raises(QMPDisconnectedError, match="quit"):
        await qmp.execute("quit")
    assert not qmp.connected
    with pytest.raises(QMPDisconnectedError, match="not connected"):
        await qmp.execute("query-status")
    await qmp.close()
    await server.close()


async def test_slow_reply_times_out() -> None:
    server = FakeQMPServer([Expect("query-status", delay=2.0)])
    qmp = await connect(server)
    with pytest.raises(VMTimeoutError, match="query-status"):
        await qmp.execute("query-status", timeout=0.2)
    await qmp.close()
    await server.close()


async def test_commands_are_serialised() -> None:
    server = FakeQMPServer([Expect("a", delay=0.1, reply=1), Expect("b", reply=2)])
    qmp = await connect(server)
    got = await asyncio.gather(qmp.execute("a"), qmp.execute("b"))
    assert got == [1, 2]
    await qmp.close()
    await server.close()
    server.assert_done()


async def test_connect_refused_path(tmp_path: object) -> None:
    qmp = QMP("t")
    with pytest.raises(QMPDisconnectedError, match="cannot connect"):
        await qmp.connect(os.path.join(str(tmp_path), "nothing.sock"), timeout=1)


async def test_listen_path_supports_reattach(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "q.sock")
    server = FakeQMPServer(
        [
            Expect("query-status", reply={"status": "running"}),
            Expect("query-status", reply={"status": "paused"}),
        ]
    )
    await server.listen(path)
    for want in ("running", "paused"):
        qmp = QMP("t")
        await qmp.connect(path, timeout=5)
        assert (await qmp.execute("query-status"))["status"] == want
        await qmp.close()
    await server.close()
    server.assert_done()
    assert server.connections == 2


async def test_no_greeting_times_out() -> None:
    import socket

    a, b = socket.socketpair()
    qmp = QMP("t")
    with pytest.raises(VMTimeoutError, match="greeting"):
        await qmp.connect(a, timeout=0.2)
    b.close()
