"""Firecracker driver lifecycle against the real v1.12.1 binary and the spec-checking fake.

The same test functions run on both backends. The guest itself cannot run on these machines
(KVM here cannot run an ordinary guest), so everything up to the VMM's own state is checked:
InstanceStart, pause/resume, snapshots, placeholder hotplug, vCPU threads, stop and cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat

import pytest
from fc_support import (  # noqa: F401 - fixtures
    Backend,
    fake_backend,
    fc_kernel,
    make_config,
    open_fds,
    real_backend,
    short_tmp,
)

from leaks import running
from net_support import namespaces
from virtcontainers import HypervisorError, StateError, UnsupportedError
from virtcontainers.devices import BlockDrive, CPUDevice, NetworkEndpoint, SharedFS
from virtcontainers.drivers.firecracker import Firecracker, FirecrackerAPIError
from virtcontainers.hypervisor import VMState, new_hypervisor
from virtcontainers.types import Capabilities

pytestmark = pytest.mark.integration


@pytest.fixture(params=["real", "fake"])
def backend(request: pytest.FixtureRequest, short_tmp: str) -> Backend:  # noqa: F811
    if request.param == "real":
        return real_backend()
    return fake_backend(short_tmp)


async def _started(
    backend: Backend, kernel: tuple[str, str], run_root: str, vm_id: str = "fc-test", **cfg: object
) -> Firecracker:
    fc = new_hypervisor("firecracker", run_root=run_root)
    assert isinstance(fc, Firecracker)
    await fc.create_sandbox(vm_id, None, make_config(backend, kernel, **cfg))
    await fc.start_sandbox(timeout=20)
    return fc


def _assert_gone(fc: Firecracker, pid: int, paths: list[str]) -> None:
    assert not running(pid), f"firecracker pid {pid} still alive"
    for p in paths:
        assert not os.path.exists(p), f"{p} left behind"


async def test_start_pause_resume_stop(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    fds_before = open_fds()
    fc = await _started(backend, fc_kernel, short_tmp)
    pid = fc.get_pids()[0]
    vm_dir, api_socket, vsock = fc.vm_dir, fc.api_socket, fc.vsock_path
    assert fc.state == VMState.RUNNING
    assert fc.api is not None
    info = await fc.api.describe()
    assert info["state"] == "Running" and info["id"] == "fc-test"
    assert os.path.exists(vsock), "hybrid vsock socket not bound at start"
    vm_config = await fc.api.get("/vm/config")
    assert vm_config["machine-config"]["vcpu_count"] == 2
    assert vm_config["machine-config"]["mem_size_mib"] == 128
    assert "console=ttyS0" in vm_config["boot-source"]["boot_args"]
    assert [d["drive_id"] for d in vm_config["drives"]] == [f"pool_{i}" for i in range(10)]
    assert [d["is_read_only"] for d in vm_config["drives"]] == [False] * 8 + [True] * 2
    await fc.check()

    await fc.pause_sandbox()
    assert (await fc.api.describe())["state"] == "Paused"
    with pytest.raises(StateError):
        await fc.pause_sandbox()
    await fc.resume_sandbox()
    assert (await fc.api.describe())["state"] == "Running"

    await fc.stop_sandbox()
    assert fc.state == VMState.STOPPED
    _assert_gone(fc, pid, [vm_dir, api_socket, vsock])
    await fc.stop_sandbox()  # idempotent
    await fc.cleanup()
    assert open_fds() == fds_before


async def test_thread_ids_are_vcpu_tasks(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    async with await _started(backend, fc_kernel, short_tmp) as fc:
        assert isinstance(fc, Firecracker)
        pid = fc.get_pids()[0]
        threads = await fc.get_thread_ids()
        assert sorted(threads) == [0, 1]
        for index, tid in threads.items():
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                assert f.read().strip() == f"fc_vcpu {index}"
        assert len(set(threads.values())) == 2


async def test_block_hotplug_patches_placeholder(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    disk = os.path.join(short_tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    async with await _started(backend, fc_kernel, short_tmp) as fc:
        assert isinstance(fc, Firecracker)
        assert fc.api is not None
        assert fc.get_virt_drive_offset() == 0
        drive = BlockDrive(id="data-1", path=disk)
        result = await fc.hotplug_add_device(drive)
        assert result is drive and drive.index == 0
        drives = {d["drive_id"]: d for d in (await fc.api.get("/vm/config"))["drives"]}
        assert drives["pool_0"]["path_on_host"] == disk
        # Firecracker takes no serial: the guest reads one derived from the file it opened.
        st = os.stat(disk)
        assert fc.block_serial(drive) == f"{st.st_dev}{st.st_rdev}{st.st_ino}"[:20]
        if backend.name == "real":
            [opened] = [
                os.stat(f"/proc/{fc.pid}/fd/{n}")
                for n in os.listdir(f"/proc/{fc.pid}/fd")
                if os.path.realpath(f"/proc/{fc.pid}/fd/{n}") == os.path.realpath(disk)
            ]
            assert (opened.st_dev, opened.st_ino) == (st.st_dev, st.st_ino)
        with pytest.raises(Exception, match="already attached"):
            await fc.hotplug_add_device(BlockDrive(id="data-1", path=disk))
        second = await fc.hotplug_add_device(BlockDrive(id="data-2", path=disk))
        assert second.index == 1
        assert fc.save().block_index_map == [0, 1]

        await fc.hotplug_remove_device(drive)
        drives = {d["drive_id"]: d for d in (await fc.api.get("/vm/config"))["drives"]}
        assert drives["pool_0"]["path_on_host"].endswith("drives/pool_0")
        assert drives["pool_1"]["path_on_host"] == disk
        with pytest.raises(Exception, match="not hotplugged"):
            await fc.hotplug_remove_device(drive)
        # the freed slot is reused first
        third = await fc.hotplug_add_device(BlockDrive(id="data-3", path=disk))
        assert third.index == 0
        # read-only disks go to the read-only placeholders (a PATCH cannot change that flag)
        ro = await fc.hotplug_add_device(BlockDrive(id="ro-1", path=disk, read_only=True))
        assert ro.index == 8
        await fc.hotplug_add_device(BlockDrive(id="ro-2", path=disk, read_only=True))
        with pytest.raises(HypervisorError, match="all 2 read-only hotplug drive slots"):
            await fc.hotplug_add_device(BlockDrive(id="ro-3", path=disk, read_only=True))


async def test_cold_plugged_drive_shifts_offset(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    disk = os.path.join(short_tmp, "cold.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    fc = new_hypervisor("firecracker", run_root=short_tmp)
    assert isinstance(fc, Firecracker)
    async with fc:
        await fc.create_sandbox("fc-cold", None, make_config(backend, fc_kernel))
        await fc.add_device(BlockDrive(id="cold.disk", path=disk, read_only=True))
        with pytest.raises(UnsupportedError):
            await fc.add_device(SharedFS(id="fs0", source=short_tmp, mount_tag="fs0"))
        await fc.start_sandbox(timeout=20)
        assert fc.api is not None
        drives = (await fc.api.get("/vm/config"))["drives"]
        assert drives[0]["drive_id"] == "cold_disk" and drives[0]["is_read_only"] is True
        assert fc.get_virt_drive_offset() == 1
        drive = await fc.hotplug_add_device(BlockDrive(id="hot", path=disk))
        assert drive.index == 1


async def test_unsupported_operations(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    async with await _started(backend, fc_kernel, short_tmp) as fc:
        assert isinstance(fc, Firecracker)
        caps = fc.capabilities()
        assert Capabilities.BLOCK_DEVICE_HOTPLUG in caps and Capabilities.PAUSE in caps
        assert Capabilities.CPU_HOTPLUG not in caps and Capabilities.FS_SHARING not in caps
        with pytest.raises(UnsupportedError, match="vCPU hotplug"):
            await fc.resize_vcpus(4)
        with pytest.raises(UnsupportedError, match="memory hotplug"):
            await fc.resize_memory(1024, 128, False)
        with pytest.raises(UnsupportedError):
            await fc.hotplug_add_device(NetworkEndpoint(id="n0", tap_name="tap0"))
        with pytest.raises(UnsupportedError):
            await fc.hotplug_add_device(CPUDevice(amount=1))


async def test_template_snapshot_and_clones(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    state = os.path.join(short_tmp, "tpl", "state")
    mem = os.path.join(short_tmp, "tpl", "mem")
    tpl_cfg = {"boot_to_be_template": True, "memory_path": mem, "devices_state_path": state}
    template = await _started(backend, fc_kernel, short_tmp, "fc-template", **tpl_cfg)
    try:
        with pytest.raises(StateError):
            await template.save_sandbox()  # must be paused
        await template.pause_sandbox()
        await template.save_sandbox()
    finally:
        await template.stop_sandbox()
    assert os.path.getsize(mem) == 128 << 20
    assert os.path.getsize(state) > 0

    clone_cfg = {"boot_from_template": True, "memory_path": mem, "devices_state_path": state}
    clones = [
        await _started(backend, fc_kernel, short_tmp, f"fc-clone{i}", **clone_cfg) for i in range(2)
    ]
    try:
        for clone in clones:
            assert clone.api is not None
            assert (await clone.api.describe())["state"] == "Running"
            assert os.path.exists(clone.vsock_path)  # each clone binds its own vsock socket
            assert sorted(await clone.get_thread_ids()) == [0, 1]
        assert clones[0].vsock_path != clones[1].vsock_path
    finally:
        for clone in clones:
            await clone.stop_sandbox()
    for clone in clones:
        assert not os.path.exists(clone.vm_dir)


async def test_reattach_from_saved_state(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    fc = await _started(backend, fc_kernel, short_tmp)
    pids = fc.get_pids()  # Firecracker, then its console log keeper
    assert len(pids) == 2 and all(running(p) for p in pids)
    try:
        data = await fc.to_grpc()
        await fc.disconnect()
        other = Firecracker(run_root=short_tmp)
        await other.from_grpc(fc.hypervisor_config(), data)
        assert other.get_pids() == pids and other.state == VMState.RUNNING
        await other.check()
        await other.pause_sandbox()
        assert other.api is not None
        assert (await other.api.describe())["state"] == "Paused"
        await other.stop_sandbox()  # not its child: pidfd-guarded SIGTERM
        assert not any(running(p) for p in pids)  # the keeper too, adopted from the state
        assert not os.path.exists(other.vm_dir)
        with pytest.raises(HypervisorError):
            await fc.check()
    finally:
        await fc.stop_sandbox()


async def test_state_round_trip_keeps_pool(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    disk = os.path.join(short_tmp, "d.img")
    open(disk, "wb").close()
    async with await _started(backend, fc_kernel, short_tmp) as fc:
        assert isinstance(fc, Firecracker)
        await fc.hotplug_add_device(BlockDrive(id="d0", path=disk))
        state = fc.save()
        other = Firecracker(run_root=short_tmp)
        other.load(state)
        assert other.save().block_index_map == [0]
        await other.hotplug_remove_device(BlockDrive(id="d0", path=disk))
        await other.disconnect()


async def test_api_error_carries_fault_message(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    async with await _started(backend, fc_kernel, short_tmp) as fc:
        assert isinstance(fc, Firecracker)
        assert fc.api is not None
        with pytest.raises(FirecrackerAPIError) as err:
            await fc.api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        assert err.value.status == 400
        assert "after starting the microVM" in err.value.fault_message
        assert "PUT /machine-config" in str(err.value)
        with pytest.raises(FirecrackerAPIError, match="unknown field `bogus`"):
            await fc.api.patch("/vm", {"state": "Paused", "bogus": 1})


async def test_concurrent_vms(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    vms = await asyncio.gather(
        *(_started(backend, fc_kernel, short_tmp, f"fc-many{i}") for i in range(3))
    )
    pids = [vm.get_pids()[0] for vm in vms]
    assert len(set(pids)) == 3
    await asyncio.gather(*(vm.stop_sandbox() for vm in vms))
    assert not any(running(p) for p in pids)
    assert os.listdir(os.path.join(short_tmp, "vm")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and taps need root")
async def test_network_interface_in_namespace(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    import subprocess

    def run(*argv: str) -> int:
        return subprocess.run(argv, capture_output=True, check=False).returncode

    async with namespaces(1, "fct") as (netns,):
        ns = netns.name
        fc = Firecracker(run_root=short_tmp)
        async with fc:
            await fc.create_sandbox("fc-net", netns.path, make_config(backend, fc_kernel))
            await fc.add_device(
                NetworkEndpoint(id="eth-0", tap_name="fctap0", mac="02:00:00:00:00:07")
            )
            await fc.start_sandbox(timeout=20)
            assert fc.api is not None
            nets = (await fc.api.get("/vm/config"))["network-interfaces"]
            assert nets[0]["iface_id"] == "eth_0" and nets[0]["host_dev_name"] == "fctap0"
            assert nets[0]["guest_mac"] == "02:00:00:00:00:07"
            pid = fc.get_pids()[0]
            ns_inode = os.stat(netns.path).st_ino
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == ns_inode  # runs in the namespace
            if backend.name == "real":  # the real VMM opens (creates) the tap in that namespace
                assert run("ip", "-n", ns, "link", "show", "fctap0") == 0
                assert run("ip", "link", "show", "fctap0") != 0


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and taps need root")
async def test_sandbox_bridge_network(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    """`--net bridge` on Firecracker, inside a test namespace: the VMM runs in the sandbox's
    namespace and takes its tap (single-queue: Firecracker opens taps without
    IFF_MULTI_QUEUE, so a multiqueue one made for 2 vCPUs would be refused) with the
    endpoint's MAC through the network-interfaces API; the real binary opens it (its carrier
    comes up). Stop removes everything. The guest side needs KVM, which cannot run here."""
    from virtcontainers import Sandbox
    from virtcontainers.network import NetworkConfig

    async with namespaces(1, "fcn") as (hostns,):
        net = NetworkConfig(mode="bridge", host_netns=hostns.path)
        sb = Sandbox(
            hypervisor="firecracker",
            config=make_config(backend, fc_kernel),
            run_root=os.path.join(short_tmp, "rr"),
            network=net,
        )
        try:
            await sb.create()
            fc = sb.hypervisor
            assert isinstance(fc, Firecracker)
            await fc.start_sandbox(timeout=20)
            assert fc.api is not None and sb.network is not None
            iface = sb.network.interfaces[0]
            nets = (await fc.api.get("/vm/config"))["network-interfaces"]
            assert [(n["iface_id"], n["host_dev_name"], n["guest_mac"]) for n in nets] == [
                ("net0", "tap0_vc", iface.mac)
            ]
            pid = fc.get_pids()[0]
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(sb.network.netns_path).st_ino
            if backend.name == "real":
                carrier = await asyncio.to_thread(_carrier, sb.network.netns_path, "tap0_vc")
                assert carrier, "firecracker did not open the tap"
        finally:
            await sb.stop()
        assert hostns.links() == ["lo"]
        assert hostns.run("nft", "list", "ruleset").strip() == ""


def _carrier(netns: str, name: str) -> bool:
    """Whether interface `name` in `netns` has carrier (a tap: some process holds it open)."""
    from pyroute2 import NetNS

    with NetNS(netns) as ns:
        (link,) = ns.get_links(ns.link_lookup(ifname=name)[0])
        return bool(link.get("IFLA_CARRIER"))


async def test_console_log_is_capped(
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Firecracker's stdout (its own start-up lines, then the guest console) goes through the
    console keeper: rotated at the cap, the newest bytes kept, the keeper gone with the VM."""
    monkeypatch.setattr(Firecracker, "console_log_max", 128)
    fc = await _started(real_backend(), fc_kernel, short_tmp)
    try:
        pids = fc.get_pids()
        log = fc.console_path
        # The real binary prints ~600 bytes of start-up lines: several rotations, after which
        # its first line is gone from both files.
        for _ in range(100):
            if os.path.exists(log + ".1") and b"Running Firecracker" not in _read_all(log):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no second rotation: {_read_all(log)!r}")
        assert os.path.getsize(log + ".1") == 128
        assert 0 < os.path.getsize(log) <= 128
    finally:
        await fc.stop_sandbox()
    assert not any(running(p) for p in pids)


def _read_all(path: str) -> bytes:
    """console.log.1 then console.log, as one stream."""
    out = b""
    for p in (path + ".1", path):
        with contextlib.suppress(FileNotFoundError), open(p, "rb") as f:
            out += f.read()
    return out


async def test_files_are_private_whatever_the_umask(
    backend: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    """Under a lax umask (002) the group still cannot reach the API socket, the vsock or the
    logs: Firecracker runs with umask 077 in a 0700 VM directory."""
    old = os.umask(0o002)
    try:
        fc = await _started(backend, fc_kernel, short_tmp)
    finally:
        os.umask(old)
    try:
        assert private_files(fc.vm_dir) >= {os.path.basename(fc.api_socket)}
        assert stat.S_IMODE(os.stat(fc.api_socket).st_mode) & 0o077 == 0
        assert os.stat(fc.api_socket).st_uid == os.geteuid()  # not jailed: the manager's
    finally:
        await fc.stop_sandbox()


def private_files(directory: str) -> set[str]:
    """Check that `directory` is 0700 and every socket and log in it is closed to group and
    others; returns the sockets' names."""
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    sockets = set()
    for name in os.listdir(directory):
        st = os.lstat(os.path.join(directory, name))
        if stat.S_ISSOCK(st.st_mode):
            sockets.add(name)
        if stat.S_ISSOCK(st.st_mode) or name.endswith(".log"):
            assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (name, oct(st.st_mode))
    return sockets
