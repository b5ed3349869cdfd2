"""The Firecracker API client: error mapping against a scripted Unix-socket HTTP server, and
the driver's checks that need no VMM process."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import (
    BlockDrive,
    HybridVSockDevice,
    NetworkEndpoint,
    SharedFS,
    VFIODevice,
)
from virtcontainers.drivers.firecracker import Firecracker, FirecrackerAPI, FirecrackerAPIError
from virtcontainers.drivers.firecracker.state import FirecrackerState
from virtcontainers.errors import (
    ConfigError,
    LaunchError,
    StateError,
    UnsupportedError,
    VMTimeoutError,
)
from virtcontainers.hypervisor import VMState, new_hypervisor
from virtcontainers.types import Capabilities, Socket


@dataclass
class Canned:
    """Scripted answers: (status, raw body) per request, in order; `delay` before answering."""

    answers: list[tuple[int, bytes]]
    delay: float = 0.0
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)


async def _serve(
    canned: Canned, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while canned.answers:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            canned.seen.append((method, path, body))
            await asyncio.sleep(canned.delay)
            status, payload = canned.answers.pop(0)
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Canned], asyncio.Future[str]]]:
    d = tempfile.mkdtemp(prefix="fca-", dir="/tmp")
    path = os.path.join(d, "api.sock")
    servers: list[asyncio.base_events.Server] = []

    async def start(canned: Canned) -> str:
        srv = await asyncio.start_unix_server(lambda r, w: _serve(canned, r, w), path)
        servers.append(srv)
        return path

    yield start  # type: ignore[misc]
    for srv in servers:
        srv.close()
        await srv.wait_closed()
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


async def test_fault_message_is_carried(server: Callable[[Canned], asyncio.Future[str]]) -> None:
    canned = Canned([(400, b'{"fault_message": "The requested operation is not supported."}')])
    api = FirecrackerAPI(await server(canned))
    with pytest.raises(FirecrackerAPIError) as err:
        await api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    e = err.value
    assert (e.method, e.path, e.status) == ("PUT", "/machine-config", 400)
    assert e.fault_message == "The requested operation is not supported."
    assert str(e) == (
        "firecracker PUT /machine-config failed (HTTP 400): "
        "The requested operation is not supported."
    )
    assert canned.seen[0][2] == b'{"vcpu_count":1,"mem_size_mib":128}'
    await api.close()


async def test_non_json_error_and_success_bodies(
    server: Callable[[Canned], asyncio.Future[str]],
) -> None:
    canned = Canned([(500, b"plain failure"), (204, b""), (200, b'{"id": "x"}'), (200, b"nope")])
    api = FirecrackerAPI(await server(canned))
    with pytest.raises(FirecrackerAPIError, match=r"HTTP 500.*plain failure"):
        await api.get("/")
    assert await api.patch("/vm", {"state": "Paused"}) is None
    assert await api.get("/") == {"id": "x"}
    with pytest.raises(FirecrackerAPIError, match="not JSON"):
        await api.get("/")
    await api.close()


async def test_slow_answer_times_out(server: Callable[[Canned], asyncio.Future[str]]) -> None:
    api = FirecrackerAPI(await server(Canned([(204, b"")], delay=1.0)), timeout=0.1)
    with pytest.raises(VMTimeoutError, match=r"PUT /actions: no answer within 0.1s"):
        await api.put("/actions", {"action_type": "InstanceStart"})
    await api.close()


async def test_no_server_is_api_error_without_status() -> None:
    api = FirecrackerAPI("/tmp/definitely-not-a-socket-fc.sock")
    with pytest.raises(FirecrackerAPIError) as err:
        await api.get("/")
    assert err.value.status is None and "no answer" in str(err.value)
    await api.close()


async def test_wait_ready_gives_up_and_reports_exit() -> None:
    api = FirecrackerAPI("/tmp/definitely-not-a-socket-fc.sock")
    with pytest.raises(VMTimeoutError, match="did not answer in time"):
        await api.wait_ready(time.monotonic() + 0.2, lambda: None)
    calls = []

    def gone() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise LaunchError("exited", exit_code=1)

    with pytest.raises(LaunchError):
        await api.wait_ready(time.monotonic() + 5, gone)
    assert len(calls) == 3
    await api.close()


async def test_wait_ready_returns_instance_info(
    server: Callable[[Canned], asyncio.Future[str]],
) -> None:
    api = FirecrackerAPI(await server(Canned([(200, b'{"state": "Not started", "id": "a"}')])))
    info = await api.wait_ready(time.monotonic() + 5, lambda: None)
    assert info["state"] == "Not started"
    await api.close()


# -- the driver without a process -------------------------------------------------------------
def _cfg(tmp: str, **kw: object) -> HypervisorConfig:
    binary = os.path.join(tmp, "firecracker")
    if not os.path.exists(binary):
        with open(binary, "w") as f:
            f.write("#!/bin/sh\nexit 1\n")
        os.chmod(binary, 0o755)
    cfg = HypervisorConfig(kernel_path="/k", initrd_path="/i", hypervisor_path=binary)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


async def test_registered_and_created_without_process(tmp_path: str) -> None:
    tmp = tempfile.mkdtemp(prefix="fcu-", dir="/tmp")
    try:
        fc = new_hypervisor("firecracker", run_root=tmp)
        assert isinstance(fc, Firecracker)
        await fc.create_sandbox("vm-a", None, _cfg(tmp))
        assert fc.state == VMState.CREATED
        assert fc.api_socket == os.path.join(tmp, "vm", "vm-a", "fc.sock")
        assert fc.get_pids() == [] and fc.get_virt_drive_offset() == 0
        sock = fc.generate_socket("vm-a", True)
        assert isinstance(sock, Socket) and sock.host_path == os.path.join(
            tmp, "vm", "vm-a", "kata.hvsock"
        )
        caps = fc.capabilities()
        expected = (
            Capabilities.BLOCK_DEVICE
            | Capabilities.BLOCK_DEVICE_HOTPLUG
            | Capabilities.PAUSE
            | Capabilities.TEMPLATE
            | Capabilities.HYBRID_VSOCK
        )
        assert caps == expected  # no fs sharing, CPU/memory/net hotplug or VFIO
        await fc.add_device(BlockDrive(id="d-1", path="/x"))
        with pytest.raises(ConfigError, match="already used"):
            await fc.add_device(BlockDrive(id="d.1", path="/y"))  # same resource id d_1
        with pytest.raises(ConfigError, match="already used"):
            await fc.add_device(BlockDrive(id="pool_3", path="/y"))
        await fc.add_device(NetworkEndpoint(id="eth0", tap_name="tap0"))
        with pytest.raises(ConfigError, match="already used"):
            await fc.add_device(NetworkEndpoint(id="eth0", tap_name="tap1"))
        with pytest.raises(ConfigError, match="clashes"):
            await fc.add_device(HybridVSockDevice(uds_path=os.path.join(tmp, "fc.sock")))
        await fc.add_device(HybridVSockDevice(uds_path="/tmp/elsewhere/a.sock", port=5000))
        assert fc.vsock_path == "/tmp/elsewhere/a.sock"  # a link to <root>/a.sock after start
        assert fc.save().driver_state(FirecrackerState).agent_port == 5000
        inside = os.path.join(tmp, "vm", "vm-a", "agent.sock")
        await fc.add_device(HybridVSockDevice(uds_path=inside, context_id=7))
        assert fc.vsock_path == inside
        for dev in (
            SharedFS(id="fs", source="/tmp", mount_tag="fs"),
            VFIODevice(id="v", bdf="0000:00:01.0"),
        ):
            with pytest.raises(UnsupportedError, match="firecracker does not support cold-plug"):
                await fc.add_device(dev)
        assert fc.get_virt_drive_offset() == 1
        with pytest.raises(StateError, match="it is created"):
            await fc.pause_sandbox()
        with pytest.raises(StateError):
            await fc.hotplug_add_device(BlockDrive(id="h", path="/x"))
        with pytest.raises(StateError):
            await fc.get_thread_ids()
        state = fc.save()
        assert state.type == "firecracker" and state.driver_state(FirecrackerState).vsock_cid == 7
        other = Firecracker(run_root=tmp)
        other.load(state)
        assert other.state == VMState.CREATED and other.get_virt_drive_offset() == 1
        assert other.hypervisor_config().hypervisor_path == fc.hypervisor_config().hypervisor_path
        with pytest.raises(StateError, match="twice"):
            await fc.create_sandbox("vm-a", None, _cfg(tmp))
        await fc.stop_sandbox()
        assert fc.state == VMState.STOPPED
        await fc.stop_sandbox()
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


async def test_create_refusals() -> None:
    tmp = tempfile.mkdtemp(prefix="fcu-", dir="/tmp")
    try:
        with pytest.raises(ConfigError, match="invalid VM id"):
            await Firecracker(run_root=tmp).create_sandbox("-x", None, _cfg(tmp))
        with pytest.raises(ConfigError, match="network namespace must be a path"):
            await Firecracker(run_root=tmp).create_sandbox("a", "netns1", _cfg(tmp))
        with pytest.raises(ConfigError, match="Missing kernel path"):
            await Firecracker(run_root=tmp).create_sandbox("a", None, _cfg(tmp, kernel_path=""))
        with pytest.raises(ConfigError, match="templates need"):
            fc = Firecracker(run_root=tmp)
            await fc.create_sandbox("a", None, _cfg(tmp))
            fc._template_paths()
        state = Firecracker(run_root=tmp).save()
        state.type = "qemu"
        with pytest.raises(StateError, match="cannot load state of a qemu VM"):
            Firecracker(run_root=tmp).load(state)
        with pytest.raises(StateError, match="firecracker: unreadable VM state"):
            await Firecracker(run_root=tmp).from_grpc(_cfg(tmp), b"{not json")
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
