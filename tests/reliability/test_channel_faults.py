"""Control channels failing under a live VM: QMP dropped, the agent socket closed mid-exec,
and the run root's filesystem full during a state write."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from rel_support import assert_clean, sandbox_kw

from virtcontainers import persist
from virtcontainers.agent import AgentTimeoutError
from virtcontainers.devices import SerialPort
from virtcontainers.errors import AgentError, StateError
from virtcontainers.hypervisor import VMState
from virtcontainers.sandbox import Sandbox

pytestmark = pytest.mark.integration


async def test_qmp_connection_dropped_is_reattached(sandbox: Sandbox) -> None:
    hv: Any = sandbox.hypervisor
    sock = hv._qmp._client._writer.transport.get_extra_info("socket")
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)  # the session is gone, as when QEMU hangs up
    await asyncio.sleep(0.2)
    await hv.check()  # re-attaches over the named socket
    await sandbox.pause()
    assert (await hv._execute("query-status"))["status"] == "paused"
    await sandbox.resume()
    assert (await sandbox.exec(["echo", "ok"])).stdout == b"ok\n"


async def test_a_frozen_guest_fails_calls_that_have_no_timeout(
    leak_check: str, guest_assets: Any
) -> None:
    """The guest stops answering (its vCPUs stopped behind the sandbox's back): file copies
    and an exec without a timeout fail with a timeout naming the operation, then work again
    once it runs. No `wait_for` here: the client's own deadlines end the calls."""
    kw = sandbox_kw(guest_assets)
    async with Sandbox("fz1", "qemu", run_root=leak_check, agent_timeout=1.0, **kw) as sb:
        assert (await sb.exec(["true"])).ok
        hv: Any = sb.hypervisor
        await hv._execute("stop")
        with pytest.raises(AgentTimeoutError, match="read_file /etc/hostname"):
            await sb.read_file("/etc/hostname")
        with pytest.raises(AgentTimeoutError, match="write_file /tmp/x"):
            await sb.write_file("/tmp/x", b"data")
        with pytest.raises(AgentTimeoutError, match=r"exec \['sleep', '100'\].*liveness ping"):
            await sb.exec(["sleep", "100"])
        await hv._execute("cont")
        assert (await sb.exec(["echo", "thawed"])).stdout == b"thawed\n"
    assert_clean(leak_check)


def agent_chardev(sb: Sandbox) -> tuple[str, str]:
    hv: Any = sb.hypervisor
    [port] = [d for d in hv.devices if isinstance(d, SerialPort)]
    return port.socket.id, port.socket.host_path


async def test_agent_socket_closed_mid_exec(sandbox: Sandbox) -> None:
    hv: Any = sandbox.hypervisor
    chardev, path = agent_chardev(sandbox)
    running = asyncio.ensure_future(sandbox.exec(["sleep", "60"]))
    await asyncio.sleep(0.5)
    assert not running.done()
    # QEMU closes the agent channel under the running exec.
    await hv._execute("chardev-change", {"id": chardev, "backend": {"type": "null", "data": {}}})
    with pytest.raises(AgentError, match="agent"):
        await running
    # The channel comes back: the sandbox reconnects on its own.
    server = {
        "addr": {"type": "unix", "data": {"path": path}},
        "server": True,
        "wait": False,
    }
    await hv._execute(
        "chardev-change", {"id": chardev, "backend": {"type": "socket", "data": server}}
    )
    res = await sandbox.exec(["echo", "reconnected"])
    assert res.stdout == b"reconnected\n"


@pytest.fixture
def tiny_run_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A 4 MiB tmpfs as the run root."""
    root = tempfile.mkdtemp(prefix="vct-full-", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", root], check=True)
    monkeypatch.setenv("VC_RUN_ROOT", root)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", root], check=False)
        os.rmdir(root)


def fill(root: str) -> str:
    filler = os.path.join(root, "filler")
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


async def test_full_run_root_keeps_the_previous_state(
    tiny_run_root: str, guest_assets: Any
) -> None:
    sb = Sandbox("full1", "qemu", run_root=tiny_run_root, **sandbox_kw(guest_assets))
    await sb.start()
    try:
        path = persist.StateStore(tiny_run_root).path("full1")
        with open(path, "rb") as f:
            before = f.read()
        filler = fill(tiny_run_root)
        # Pause and resume rewrite one byte in place: they need no space and still work.
        await sb.pause()
        await sb.resume()
        # A hotplug rewrites the document: refused, undone, the old document kept whole.
        fd, disk = tempfile.mkstemp(prefix="vct-disk-", dir="/tmp")
        os.ftruncate(fd, 8 << 20)
        os.close(fd)
        try:
            with pytest.raises(StateError, match=r"cannot write .*persist.json: No space left"):
                await sb.add_disk(disk, "d1")
            with open(path, "rb") as f:
                assert f.read() == before  # the old document, whole
            assert json.loads(before)["sandbox"]["disks"] == {}
            assert sorted(os.listdir(os.path.dirname(path))) == ["lock", "persist.json", "runstate"]
            # The hotplug was undone: the VM and its state file agree.
            assert "d1" not in sb.disks
            assert sb.state is VMState.RUNNING
            qdev = await sb.hypervisor._execute("query-block")  # type: ignore[attr-defined]
            assert disk not in json.dumps(qdev)
            assert (await sb.exec(["echo", "ok"])).stdout == b"ok\n"
            os.unlink(filler)
            drive = await sb.add_disk(disk, "d2")
            await sb.remove_disk(drive)
        finally:
            os.unlink(disk)
    finally:
        await sb.stop()
    assert_clean(tiny_run_root)
