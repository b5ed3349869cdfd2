"""Cloud Hypervisor driver against a VMM process: the spec-validating fake, or a real binary.

The fake (`tests/fakes/clh`) runs as a separate process, validates every request body against
the official OpenAPI spec and answers like the real server. Cases parametrised with "real" run
the same steps against `$VC_CLOUD_HYPERVISOR` when it is set and KVM is usable here.
Every test ends with a leak check: no process, child, file, socket or fd left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from fakes.clh.launcher import write_launcher
from leaks import LeakCheck, running
from virtcontainers import host, kvm_probe
from virtcontainers.agent import AGENT_PORT
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import (
    BlockDrive,
    CPUDevice,
    MemoryHotplug,
    NetworkEndpoint,
    SharedFS,
    VFIODevice,
    VhostUserDevice,
)
from virtcontainers.drivers.clh import ClhApi, ClhApiError, CloudHypervisor
from virtcontainers.errors import (
    AssetError,
    ConfigError,
    LaunchError,
    StateError,
    UnsupportedError,
    VMExitedError,
    VMTimeoutError,
)
from virtcontainers.hypervisor import VMState, new_hypervisor
from virtcontainers.persist import HypervisorState
from virtcontainers.types import Capabilities, Socket

pytestmark = pytest.mark.integration

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


@dataclass
class ClhEnv:
    """A private run root, a short scratch directory and the VMM binary under test."""

    root: str
    tmp: str
    backend: str
    drivers: list[CloudHypervisor] = field(default_factory=list)
    real_binary: str = ""

    def binary(self, *fake_args: str) -> str:
        """The VMM to run: the real binary, or a launcher for the fake with `fake_args`."""
        if self.backend == "real":
            return self.real_binary
        name = f"cloud-hypervisor-{len(os.listdir(self.tmp))}"
        return write_launcher(os.path.join(self.tmp, name), "tests.fakes.clh", fake_args)

    def file(self, name: str, data: bytes = b"x" * 4096) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def config(self, *fake_args: str, **overrides: Any) -> HypervisorConfig:
        if self.backend == "real":
            from virtcontainers.guest import ensure_assets

            assets = ensure_assets()
            kernel, initrd = str(assets.kernel), str(assets.initrd)
        else:
            kernel, initrd = self.file("vmlinux"), self.file("initrd.img")
        cfg = HypervisorConfig(
            kernel_path=kernel,
            initrd_path=initrd,
            hypervisor_path=self.binary(*fake_args),
            num_vcpus=1,
            default_max_vcpus=4,
            memory_size=256,
            shared_fs="virtio-fs",
        )
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg

    async def create(self, cfg: HypervisorConfig, id: str = "vm1") -> CloudHypervisor:
        h = new_hypervisor("clh", run_root=self.root)
        assert isinstance(h, CloudHypervisor)
        self.drivers.append(h)
        await h.create_sandbox(id, None, cfg)
        return h

    async def start(self, cfg: HypervisorConfig, id: str = "vm1") -> CloudHypervisor:
        h = await self.create(cfg, id)
        await h.start_sandbox(20)
        return h


def _real_binary() -> str:
    path = os.environ.get("VC_CLOUD_HYPERVISOR", "")
    if not path:
        pytest.skip(
            "VC_CLOUD_HYPERVISOR is not set: no real cloud-hypervisor binary "
            "(none can be installed on this machine); the fake covers these steps"
        )
    if not os.access(path, os.X_OK):
        pytest.skip(f"VC_CLOUD_HYPERVISOR={path} is not an executable file")
    if not host.kvm_usable():
        pytest.skip(
            f"cloud-hypervisor needs a usable KVM and host.kvm_usable() is false here "
            f"({kvm_probe.cached_kvm_probe().reason})"
        )
    return path


async def _env(run_root: str, backend: str) -> AsyncIterator[ClhEnv]:
    real = _real_binary() if backend == "real" else ""
    tmp = tempfile.mkdtemp(prefix="clht-", dir="/tmp")
    check = LeakCheck(run_root)
    try:
        yield ClhEnv(run_root, tmp, backend, real_binary=real)
        await check.verify()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(params=["fake", "real"])
async def env(run_root: str, request: pytest.FixtureRequest) -> AsyncIterator[ClhEnv]:
    """Fake and real backends (the real one skips with the reason when unavailable)."""
    async for e in _env(run_root, request.param):
        yield e


@pytest.fixture
async def fake(run_root: str) -> AsyncIterator[ClhEnv]:
    """The fake backend only: for faults a real binary cannot be made to show."""
    async for e in _env(run_root, "fake"):
        yield e


async def vm_info(api_socket: str) -> dict[str, Any]:
    """`vm.info` through a short-lived client (closed again: the leak check counts fds)."""
    api = ClhApi(api_socket)
    try:
        return await api.info()
    finally:
        await api.close()


def _threads(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


# -- lifecycle -------------------------------------------------------------------------------
async def test_full_lifecycle(env: ClhEnv) -> None:
    h = await env.create(env.config())
    assert h.state is VMState.CREATED
    assert h.get_pids() == []
    await h.start_sandbox(20)
    assert str(h.state) == "running"
    [pid] = h.get_pids()
    assert running(pid)
    await h.check()
    info = await vm_info(h.api_socket)
    assert info["state"] == "Running"
    assert info["config"]["cpus"]["boot_vcpus"] == 1
    assert info["config"]["cpus"]["max_vcpus"] == 4
    assert info["config"]["memory"]["size"] == 256 << 20
    tids = await h.get_thread_ids()
    assert list(tids) == [0] and tids[0] in _threads(pid)
    console = await h.get_sandbox_console("vm1")
    assert console == os.path.join(h.vm_dir, "console.sock") and os.path.exists(console)
    assert os.path.exists(h.hybrid_vsock().uds_path)
    assert h.hybrid_vsock().port == AGENT_PORT
    sock = h.generate_socket("vm1", use_vsock=True)
    assert isinstance(sock, Socket) and sock.host_path == h.hybrid_vsock().uds_path

    await h.pause_sandbox()
    assert (await vm_info(h.api_socket))["state"] == "Paused"
    await h.check()
    await h.resume_sandbox()
    assert (await vm_info(h.api_socket))["state"] == "Running"

    await h.stop_sandbox()
    assert str(h.state) == "stopped"
    assert not running(pid)
    assert not os.path.exists(h.vm_dir)
    await h.stop_sandbox()  # idempotent
    await h.cleanup()
    assert h.get_pids() == []


async def test_launch_flags_and_log(fake: ClhEnv) -> None:
    h = await fake.start(fake.config(debug=True))
    with open(f"/proc/{h.get_pids()[0]}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    log = os.path.join(h.vm_dir, "cloud-hypervisor.log")
    i = argv.index("--api-socket")
    assert argv[i + 1] == f"path={h.api_socket}"
    assert argv[argv.index("--log-file") + 1] == log
    assert "-v" in argv
    with open(log) as f:
        assert "PUT /api/v1/vm.boot" in f.read()
    cmdline = (await vm_info(h.api_socket))["config"]["payload"]["cmdline"].split()
    assert "debug" in cmdline and "quiet" not in cmdline
    await h.stop_sandbox()
    h2 = await fake.start(fake.config(), id="vm2")
    with open(f"/proc/{h2.get_pids()[0]}/cmdline", "rb") as f:
        assert b"-v" not in f.read().split(b"\0")
    await h2.stop_sandbox()


async def test_files_are_private_whatever_the_umask(fake: ClhEnv) -> None:
    """Under a lax umask (002) the group cannot reach the API or console socket (a shell in
    the guest) or the logs: the VM directory is 0700, Cloud Hypervisor runs with umask 077."""
    old = os.umask(0o002)
    try:
        h = await fake.start(fake.config())
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(h.vm_dir).st_mode) == 0o700
        names = set(os.listdir(h.vm_dir))
        assert {os.path.basename(h.api_socket), "cloud-hypervisor.log"} <= names
        for name in names:
            st = os.lstat(os.path.join(h.vm_dir, name))
            if stat.S_ISSOCK(st.st_mode) or name.endswith(".log"):
                assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (name, oct(st.st_mode))
                assert st.st_uid == os.geteuid()
    finally:
        await h.stop_sandbox()


async def test_agent_over_hybrid_vsock_is_refused_without_a_guest(fake: ClhEnv) -> None:
    from virtcontainers.agent import AgentClient, HybridVsock
    from virtcontainers.errors import AgentError

    h = await fake.start(fake.config())
    try:
        # Refused until the deadline; a loaded machine may not get an answer within 1 s.
        with pytest.raises(AgentError, match="CONNECT refused"):
            await AgentClient.connect(HybridVsock(h.hybrid_vsock().uds_path, AGENT_PORT), 3.0)
    finally:
        await h.stop_sandbox()


async def test_stop_before_start_and_context_manager(fake: ClhEnv) -> None:
    h = await fake.create(fake.config())
    await h.stop_sandbox()
    assert h.state is VMState.STOPPED
    await h.stop_sandbox()
    async with await fake.start(fake.config(), id="vm2") as h2:
        pid = h2.get_pids()[0]
        assert running(pid)
    assert not running(pid)


async def test_lifecycle_state_errors(fake: ClhEnv) -> None:
    h = await fake.create(fake.config())
    with pytest.raises(StateError, match="cannot pause VM vm1: it is created"):
        await h.pause_sandbox()
    with pytest.raises(StateError):
        await h.hotplug_add_device(BlockDrive("d1", fake.file("d1")))
    await h.start_sandbox(20)
    with pytest.raises(StateError, match="cannot start"):
        await h.start_sandbox(20)
    with pytest.raises(StateError, match="cannot resume"):
        await h.resume_sandbox()
    with pytest.raises(StateError, match="cannot clean up"):
        await h.cleanup()
    await h.stop_sandbox()


async def test_create_refuses_bad_inputs(fake: ClhEnv) -> None:
    h = CloudHypervisor(run_root=fake.root)
    with pytest.raises(ConfigError, match="invalid id"):
        await h.create_sandbox("bad/id", None, fake.config())
    cfg = fake.config()
    cfg.hypervisor_path = os.path.join(fake.tmp, "missing-binary")
    with pytest.raises(AssetError, match="missing-binary"):
        await h.create_sandbox("vm1", None, cfg)
    with pytest.raises(ConfigError, match="network namespace"):
        await h.create_sandbox("vm1", "/nonexistent/netns", fake.config())
    assert h.state is VMState.NEW


# -- faults ----------------------------------------------------------------------------------
async def test_early_exit_is_a_launch_error_with_log_tail(fake: ClhEnv) -> None:
    h = await fake.create(fake.config("--fake-exit-at-start", "3"))
    with pytest.raises(LaunchError) as ei:
        await h.start_sandbox(20)
    assert ei.value.exit_code == 3
    assert "injected start-up failure" in ei.value.log_tail
    assert "--api-socket" in ei.value.argv
    assert not os.path.exists(h.vm_dir)


async def test_hang_on_boot_times_out_and_leaves_nothing(fake: ClhEnv) -> None:
    h = await fake.create(fake.config("--fake-hang", "vm.boot"))
    with pytest.raises(VMTimeoutError, match=r"vm.boot"):
        await h.start_sandbox(4)
    assert h.get_pids() == []
    assert not os.path.exists(h.vm_dir)


async def test_api_socket_never_appears_times_out(fake: ClhEnv) -> None:
    h = await fake.create(fake.config("--fake-no-listen"))
    with pytest.raises(VMTimeoutError, match="did not"):
        await h.start_sandbox(1.5)
    assert h.get_pids() == []


async def test_slow_answers_within_the_timeout_work(fake: ClhEnv) -> None:
    h = await fake.start(fake.config("--fake-delay", "vm.boot=0.4", "--fake-delay", "vm.pause=0.4"))
    h.api_timeout = 5.0
    await h.pause_sandbox()
    assert h.state is VMState.PAUSED
    await h.stop_sandbox()


async def test_slow_answer_beyond_the_api_timeout(fake: ClhEnv) -> None:
    h = await fake.start(fake.config("--fake-delay", "vm.pause=3"))
    h.api_timeout = 0.5
    await h.disconnect()
    with pytest.raises(VMTimeoutError, match=r"vm\.pause: no answer within 0\.5s"):
        await h.pause_sandbox()
    assert h.state is VMState.RUNNING
    await h.stop_sandbox()


async def test_crash_mid_call_is_a_clear_error(fake: ClhEnv) -> None:
    h = await fake.start(fake.config("--fake-crash", "vm.pause"))
    pid = h.get_pids()[0]
    with pytest.raises(VMExitedError) as ei:
        await h.pause_sandbox()
    text = str(ei.value)
    assert "vm.pause" in text and "exited with code 134" in text
    assert "injected crash on vm.pause" in text
    assert not running(pid)
    with pytest.raises(VMExitedError, match="is gone"):
        await h.check()
    await h.stop_sandbox()


async def test_stop_escalates_to_sigkill(fake: ClhEnv) -> None:
    h = await fake.start(fake.config("--fake-ignore-sigterm", "--fake-ignore-shutdown"))
    h.stop_grace = 0.3
    pid = h.get_pids()[0]
    await h.stop_sandbox()
    assert not running(pid)
    assert h.state is VMState.STOPPED


async def test_api_error_body_reaches_the_message(fake: ClhEnv) -> None:
    h = await fake.start(fake.config())
    with pytest.raises(ClhApiError) as ei:
        await h.hotplug_add_device(BlockDrive("d1", os.path.join(fake.tmp, "no-such-disk")))
    assert ei.value.status == 500
    assert "vm.add-disk" in str(ei.value)
    assert "Failed to open disk image" in str(ei.value)
    await h.stop_sandbox()


# -- hotplug ---------------------------------------------------------------------------------
async def test_hotplug_disk_and_net(env: ClhEnv) -> None:
    h = await env.start(env.config())
    caps = h.capabilities()
    assert Capabilities.BLOCK_DEVICE_HOTPLUG in caps and Capabilities.NET_DEVICE_HOTPLUG in caps
    disk = BlockDrive("disk1", env.file("disk1.img"), read_only=True)
    assert await h.hotplug_add_device(disk) is disk
    assert disk.pci_path and int(disk.pci_path, 16) > 0
    with pytest.raises(ConfigError, match="already hotplugged"):
        await h.hotplug_add_device(BlockDrive("disk1", env.file("disk1b.img")))
    nic = NetworkEndpoint("eth1", "tap-vc1", mac="02:00:00:00:00:01", queues=2)
    await h.hotplug_add_device(nic)
    assert nic.pci_path and nic.pci_path != disk.pci_path
    info = await vm_info(h.api_socket)
    disks = {d["id"]: d for d in info["config"]["disks"]}
    assert disks["disk1"]["readonly"] is True
    # The guest reads the serial Sandbox.add_disk waits for (cut to virtio-blk's 20 bytes).
    assert disks["disk1"]["serial"] == h.block_serial(disk) == "disk1"
    long = BlockDrive("a-disk-id-longer-than-twenty", env.file("disk2.img"))
    await h.hotplug_add_device(long)
    info = await vm_info(h.api_socket)
    assert {d["id"]: d for d in info["config"]["disks"]}[long.id]["serial"] == long.id[:20]
    await h.hotplug_remove_device(long)
    [net] = info["config"]["net"]
    assert net["num_queues"] == 4 and net["mac"] == "02:00:00:00:00:01"
    await h.hotplug_remove_device(disk)
    await h.hotplug_remove_device(nic)
    info = await vm_info(h.api_socket)
    assert not info["config"].get("disks") and not info["config"].get("net")
    with pytest.raises(ClhApiError) as ei:
        await h.hotplug_remove_device(disk)
    assert ei.value.status == 404
    await h.stop_sandbox()


@pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK), reason=f"{VIRTIOFSD} is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd sandboxes itself in namespaces: root only")
async def test_hotplug_virtio_fs_runs_virtiofsd(fake: ClhEnv) -> None:
    share_dir = os.path.join(fake.tmp, "share")
    os.mkdir(share_dir)
    h = await fake.start(fake.config())
    share = SharedFS("fs1", share_dir, "tag1")
    await h.hotplug_add_device(share)
    vmm_pid, fs_pid = h.get_pids()
    assert running(fs_pid)
    with open(f"/proc/{fs_pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    assert cmdline[0] == VIRTIOFSD.encode() and f"source={share_dir}".encode() in cmdline
    sock = os.path.join(h.vm_dir, "fs-fs1.sock")
    assert os.path.exists(os.path.join("/run/virtiofsd", sock.replace("/", ".") + ".pid"))
    info = await vm_info(h.api_socket)
    assert info["config"]["fs"] == [
        {"tag": "tag1", "socket": sock, "num_queues": 1, "queue_size": 1024, "id": "fs1"}
    ]
    assert h.save().virtiofsd_pid == fs_pid
    await h.hotplug_remove_device(share)
    assert h.get_pids() == [vmm_pid]
    assert not running(fs_pid)
    assert not os.path.exists(sock)
    # a second share stays until stop, which must take its daemon down too
    await h.hotplug_add_device(SharedFS("fs2", share_dir, "tag2"))
    fs2_pid = h.get_pids()[1]
    await h.stop_sandbox()
    assert not running(fs2_pid)
    # the C virtiofsd leaves a pid file named after its socket: the driver removes it
    marker = h.vm_dir.replace("/", ".")
    left = [n for n in os.listdir("/run/virtiofsd") if marker in n]
    assert left == []


@pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK), reason=f"{VIRTIOFSD} is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd sandboxes itself in namespaces: root only")
async def test_cold_plugged_share_starts_virtiofsd_before_boot(fake: ClhEnv) -> None:
    share_dir = os.path.join(fake.tmp, "share")
    os.mkdir(share_dir)
    h = await fake.create(fake.config())
    await h.add_device(SharedFS("rootshare", share_dir, "kataShared"))
    await h.start_sandbox(20)
    assert len(h.get_pids()) == 2
    info = await vm_info(h.api_socket)
    assert info["config"]["memory"]["shared"] is True
    assert info["config"]["fs"][0]["tag"] == "kataShared"
    await h.stop_sandbox()


async def test_hotplug_vfio_device(fake: ClhEnv) -> None:
    sysfs = os.path.join(fake.tmp, "0000:00:1f.0")
    os.mkdir(sysfs)
    h = await fake.start(fake.config())
    dev = VFIODevice("gpu0", "0000:00:1f.0", sysfs_dev=sysfs)
    await h.hotplug_add_device(dev)
    assert dev.pci_path
    info = await vm_info(h.api_socket)
    assert info["config"]["devices"] == [{"path": sysfs, "id": "gpu0"}]
    await h.hotplug_remove_device(dev)
    await h.stop_sandbox()


async def test_resize_vcpus(env: ClhEnv) -> None:
    h = await env.start(env.config())
    assert await h.resize_vcpus(3) == (1, 3)
    tids = await h.get_thread_ids()
    assert sorted(tids) == [0, 1, 2]
    assert len(set(tids.values())) == 3
    assert await h.resize_vcpus(9) == (3, 4)  # capped at max_vcpus
    assert await h.resize_vcpus(2) == (4, 2)
    assert sorted(await h.get_thread_ids()) == [0, 1]
    assert await h.hotplug_add_device(CPUDevice(1)) == 3
    assert await h.hotplug_remove_device(CPUDevice(2)) == 1
    assert (await vm_info(h.api_socket))["config"]["cpus"]["boot_vcpus"] == 1
    with pytest.raises(ConfigError, match="minimum 1"):
        await h.resize_vcpus(0)
    await h.stop_sandbox()


async def test_resize_memory_acpi(env: ClhEnv) -> None:
    h = await env.start(env.config())
    assert Capabilities.MEMORY_HOTPLUG in h.capabilities()
    size, dev = await h.resize_memory(300, 128, False)
    assert size == 384 and dev.size_mb == 128
    info = await vm_info(h.api_socket)
    assert info["config"]["memory"]["hotplugged_size"] == 128 << 20
    mdev = await h.hotplug_add_device(MemoryHotplug(128))
    assert mdev.size_mb == 128
    assert h.save().hotplugged_memory == 256
    with pytest.raises(UnsupportedError, match="clh does not support shrinking memory"):
        await h.resize_memory(256, 128, False)
    with pytest.raises(ConfigError, match="exceeds the memory maximum"):
        await h.resize_memory(10**7, 128, False)
    await h.stop_sandbox()


async def test_resize_memory_virtio_mem_can_shrink(fake: ClhEnv) -> None:
    h = await fake.start(fake.config(virtio_mem=True))
    assert Capabilities.VIRTIO_MEM in h.capabilities()
    info = await vm_info(h.api_socket)
    assert info["config"]["memory"]["hotplug_method"] == "VirtioMem"
    await h.resize_memory(512, 128, False)
    size, dev = await h.resize_memory(256, 128, False)
    assert size == 256 and dev.size_mb == -256
    assert (await vm_info(h.api_socket))["config"]["memory"]["hotplugged_size"] == 0
    await h.stop_sandbox()


# -- snapshot / template ---------------------------------------------------------------------
async def test_template_snapshot_and_restore(env: ClhEnv) -> None:
    state_dir = os.path.join(env.tmp, "template-state")
    mem = os.path.join(env.tmp, "template-mem")
    tcfg = env.config(boot_to_be_template=True, memory_path=mem, devices_state_path=state_dir)
    template = await env.start(tcfg, id="tmpl")
    await template.save_sandbox()
    assert template.state is VMState.PAUSED
    assert (await vm_info(template.api_socket))["state"] == "Paused"
    assert {"config.json", "state.json"} <= set(os.listdir(state_dir))
    await template.stop_sandbox()

    clones = []
    for i in range(2):  # two clones at once: each needs its own sockets
        ccfg = env.config(boot_from_template=True, memory_path=mem, devices_state_path=state_dir)
        clone = await env.start(ccfg, id=f"clone{i}")
        clones.append(clone)
        info = await vm_info(clone.api_socket)
        assert info["state"] == "Running"
        assert info["config"]["vsock"]["socket"] == clone.hybrid_vsock().uds_path
        assert info["config"]["serial"]["socket"] == clone.serial_socket
        assert await clone.get_thread_ids()
    for clone in clones:
        await clone.stop_sandbox()


async def test_save_requires_a_state_path(fake: ClhEnv) -> None:
    h = await fake.start(fake.config())
    with pytest.raises(ConfigError, match="devices_state_path"):
        await h.save_sandbox()
    await h.stop_sandbox()


async def test_restore_from_a_missing_template_fails_cleanly(fake: ClhEnv) -> None:
    missing = os.path.join(fake.tmp, "nothing-here")
    os.mkdir(missing)
    cfg = fake.config(boot_from_template=True, memory_path="/x", devices_state_path=missing)
    h = await fake.create(cfg)
    with pytest.raises(AssetError, match=r"config\.json"):
        await h.start_sandbox(20)
    assert h.get_pids() == []


# -- persistence -----------------------------------------------------------------------------
_ATTACH_SCRIPT = r"""
import asyncio, json, sys
from virtcontainers.drivers.clh import CloudHypervisor
from virtcontainers.devices import BlockDrive
from virtcontainers.persist import HypervisorState

async def main():
    state = HypervisorState.model_validate_json(open(sys.argv[1]).read())
    h = CloudHypervisor()
    h.load(state)
    out = {"pids": h.get_pids(), "state": h.state.value}
    await h.check()
    await h.pause_sandbox()
    await h.resume_sandbox()
    out["tids"] = await h.get_thread_ids()
    disk = BlockDrive("late", sys.argv[2])
    await h.hotplug_add_device(disk)
    out["pci"] = disk.pci_path
    out["resize"] = await h.resize_vcpus(2)
    await h.stop_sandbox()
    out["after"] = h.state.value
    print(json.dumps(out))

asyncio.run(main())
"""


async def test_save_load_reattach_from_a_second_process(env: ClhEnv) -> None:
    h = await env.start(env.config())
    pid = h.get_pids()[0]
    state_file = os.path.join(env.tmp, "state.json")
    with open(state_file, "w") as f:
        f.write(h.save().model_dump_json())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _ATTACH_SCRIPT,
        state_file,
        env.file("late.img"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["pids"] == [pid] and result["state"] == "running"
    assert list(result["tids"]) == ["0"]
    assert result["pci"]
    assert result["resize"] == [1, 2]
    assert result["after"] == "stopped"
    assert not running(pid)
    await h.stop_sandbox()  # reaps our child; nothing else to do
    assert h.state is VMState.STOPPED


async def test_load_never_signals_a_reused_pid(fake: ClhEnv) -> None:
    h = await fake.start(fake.config())
    pid = h.get_pids()[0]
    state = h.save()
    assert state.pid == pid and state.pid_start_time
    state.pid_start_time = state.pid_start_time + 12345  # "another process with that pid"
    other = CloudHypervisor(run_root=fake.root)
    other.load(state)
    with pytest.raises(VMExitedError):
        await other.check()
    other.vm_dir = ""  # keep the real VM's directory: this driver must only drop its handle
    other.api_socket = os.path.join(fake.tmp, "no-api.sock")
    await other.stop_sandbox()
    assert running(pid)
    await h.stop_sandbox()
    assert not running(pid)


async def test_state_round_trip_and_grpc_handover(fake: ClhEnv) -> None:
    h = await fake.start(fake.config())
    await h.resize_vcpus(2)
    state = HypervisorState.model_validate_json(h.save().model_dump_json())
    assert state.type == "clh" and state.api_socket == h.api_socket
    assert [v.id for v in state.hotplugged_vcpus] == ["1"]
    assert state.console_socket == h.serial_socket
    assert state.agent_socket == h.hybrid_vsock().uds_path
    taker = CloudHypervisor(run_root=fake.root)
    await taker.from_grpc(h.hypervisor_config(), await h.to_grpc())
    assert taker.get_pids() == h.get_pids()
    assert taker.hypervisor_config() is h.hypervisor_config()
    await taker.pause_sandbox()
    assert (await vm_info(h.api_socket))["state"] == "Paused"
    await taker.disconnect()
    with pytest.raises(StateError, match="clh: unreadable VM state"):
        await CloudHypervisor().from_grpc(h.hypervisor_config(), b"not json")
    h.state = VMState.PAUSED
    await h.stop_sandbox()


# -- what the capabilities deny --------------------------------------------------------------
async def test_denied_operations_raise_unsupported(fake: ClhEnv) -> None:
    cfg = fake.config(shared_fs="virtio-9p", disable_block_device_use=True)
    h = await fake.start(cfg)
    caps = h.capabilities()
    assert Capabilities.FS_SHARING not in caps
    assert Capabilities.BLOCK_DEVICE not in caps
    assert Capabilities.BLOCK_DEVICE_HOTPLUG not in caps
    assert Capabilities.VHOST_USER_HOTPLUG not in caps
    assert Capabilities.VSOCK not in caps
    share_dir = os.path.join(fake.tmp, "share")
    os.mkdir(share_dir)
    cases = [
        (h.hotplug_add_device(SharedFS("fs1", share_dir, "t")), "hotplug of shared fs fs1"),
        (h.hotplug_add_device(BlockDrive("d1", fake.file("d1"))), "block device hotplug"),
        (
            h.hotplug_add_device(VhostUserDevice("vu1", os.path.join(fake.tmp, "vu.sock"))),
            "hotplug of VhostUserDevice",
        ),
        (
            h.hotplug_remove_device(VhostUserDevice("vu1", os.path.join(fake.tmp, "vu.sock"))),
            "hot-remove of VhostUserDevice",
        ),
    ]
    for coro, operation in cases:
        with pytest.raises(UnsupportedError) as ei:
            await coro
        assert ei.value.hypervisor == "clh" and ei.value.operation == operation
    await h.stop_sandbox()


async def test_nine_p_shares_are_refused_at_cold_plug(fake: ClhEnv) -> None:
    h = await fake.create(fake.config())
    share_dir = os.path.join(fake.tmp, "share")
    os.mkdir(share_dir)
    with pytest.raises(UnsupportedError, match="virtio-9p"):
        await h.add_device(SharedFS("p9", share_dir, "t", fs_type="virtio-9p"))
    await h.stop_sandbox()


# -- networking ------------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and taps need root")
async def test_sandbox_bridge_network_through_the_api(fake: ClhEnv) -> None:
    """`--net bridge` on Cloud Hypervisor, inside a test namespace: the VMM runs in the
    sandbox's namespace and is given its multiqueue tap (one queue pair per vCPU) and the
    endpoint's MAC through the `net` config; stop removes everything again. The macvtap
    model and user-mode networking are refused before anything is made."""
    from net_support import namespaces
    from virtcontainers import Sandbox
    from virtcontainers.network import NetworkConfig, PortMapping

    rr = os.path.join(fake.tmp, "rr")  # the sandbox's own run root (its state directory)
    async with namespaces(1, "clhn") as (hostns,):
        cfg = NetworkConfig(mode="bridge", host_netns=hostns.path, ports=[PortMapping(18110, 80)])
        sb = Sandbox(hypervisor="clh", config=fake.config(num_vcpus=2), run_root=rr, network=cfg)
        try:
            await sb.create()
            await sb.hypervisor.start_sandbox(20)
            assert sb.network is not None
            # What Sandbox.start does while the VM boots (the fake runs no guest agent).
            await sb.network.join_bridge()
            iface = sb.network.interfaces[0]
            info = await vm_info(sb.hypervisor.api_socket)  # type: ignore[attr-defined]
            nets = info["config"]["net"]
            assert [(n["id"], n["tap"], n["mac"], n["num_queues"]) for n in nets] == [
                ("net0", "tap0_vc", iface.mac.lower(), 4)
            ]
            pid = sb.hypervisor.get_pids()[0]
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(sb.network.netns_path).st_ino
            assert await asyncio.to_thread(tun_multi_queue, sb.network.netns_path, "tap0_vc")
            assert "table ip virtc" in hostns.run("nft", "list", "ruleset")
        finally:
            await sb.stop()
        assert hostns.links() == ["lo"]
        assert hostns.run("nft", "list", "ruleset").strip() == ""
        for bad, what in (("user", "--net user"), ("macvtap", "macvtap network model")):
            req = (
                NetworkConfig(mode="user")
                if bad == "user"
                else NetworkConfig(mode="bridge", host_netns=hostns.path, model="macvtap")
            )
            refused = Sandbox(hypervisor="clh", config=fake.config(), run_root=rr, network=req)
            with pytest.raises(UnsupportedError, match=what):
                await refused.create()
        assert hostns.links() == ["lo"]


def tun_multi_queue(netns: str, name: str) -> bool:
    """Whether tap `name` in namespace `netns` was made multiqueue."""
    from pyroute2 import NetNS

    with NetNS(netns) as ns:
        (link,) = ns.get_links(ns.link_lookup(ifname=name)[0])
        data = link.get("IFLA_LINKINFO").get("IFLA_INFO_DATA")
        return bool(data.get("IFLA_TUN_MULTI_QUEUE"))
