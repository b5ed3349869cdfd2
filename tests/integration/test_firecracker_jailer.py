"""Firecracker under the real jailer (v1.12.1): chroot layout, assets inside the jail, API
paths relative to it, hotplug and templates through the jail, and full cleanup of the jail
(the jailer itself never cleans up)."""

from __future__ import annotations

import os
import pwd
import stat

import pytest
from fc_support import (  # noqa: F401 - fixtures
    Backend,
    fc_kernel,
    make_config,
    open_fds,
    real_backend,
    short_tmp,
)

from leaks import running
from virtcontainers.devices import BlockDrive, Device, HybridVSockDevice
from virtcontainers.drivers.firecracker import Firecracker
from virtcontainers.drivers.firecracker.jail import CGROUP_ROOT
from virtcontainers.types import Param

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root (chroot, mknod, setuid)"),
]


@pytest.fixture
def jailed(short_tmp: str) -> Backend:  # noqa: F811
    backend = real_backend()
    if not os.access(backend.jailer, os.X_OK):
        pytest.skip(f"no jailer binary at {backend.jailer}")
    return backend


async def _start(
    backend: Backend,
    kernel: tuple[str, str],
    run_root: str,
    vm_id: str,
    devices: tuple[Device, ...] = (),
    **cfg: object,
) -> Firecracker:
    fc = Firecracker(run_root=run_root)
    config = make_config(backend, kernel, jailer_path=backend.jailer, **cfg)
    await fc.create_sandbox(vm_id, None, config)
    for device in devices:
        await fc.add_device(device)
    await fc.start_sandbox(timeout=20)
    return fc


async def test_jailed_lifecycle(
    jailed: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    fds = open_fds()
    # the sandbox layer asks for the agent socket in the VM directory, outside the jail
    agent_sock = os.path.join(short_tmp, "vm", "fc-jail", "agent-vsock.sock")
    vsock = HybridVSockDevice(uds_path=agent_sock, port=1024)
    fc = await _start(jailed, fc_kernel, short_tmp, "fc-jail", (vsock,))
    assert fc.jailer is not None and fc.root is not None
    jail_dir = fc.jailer.jail_dir("fc-jail")
    root = fc.root.path
    assert root == os.path.join(short_tmp, "jail", "firecracker", "fc-jail", "root")
    pid = fc.get_pids()[0]
    # chrooted (pivot_root in its own mount namespace): its / holds the jail, not the host
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert os.path.exists(f"/proc/{pid}/root/vmlinux")
    assert not os.path.exists(f"/proc/{pid}/root/etc")
    assert fc.api_socket == os.path.join(root, "run", "firecracker.socket")
    assert os.path.exists(os.path.join(root, "vmlinux"))
    assert os.path.exists(os.path.join(root, "initrd.img"))
    assert fc.vsock_path == agent_sock
    assert os.readlink(agent_sock) == os.path.join(root, "agent-vsock.sock")
    assert stat.S_ISSOCK(os.stat(agent_sock).st_mode)  # the link resolves to the bound socket
    assert fc.api is not None
    vm_config = await fc.api.get("/vm/config")
    assert vm_config["boot-source"]["kernel_image_path"] == "vmlinux"
    assert sorted(await fc.get_thread_ids()) == [0, 1]

    disk = os.path.join(short_tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    drive = await fc.hotplug_add_device(BlockDrive(id="jdisk", path=disk))
    inside = os.path.join(root, "drives", "disk_0")
    assert os.path.samefile(inside, disk)  # same inode: the guest writes the real disk
    await fc.pause_sandbox()
    await fc.resume_sandbox()
    await fc.hotplug_remove_device(drive)
    assert not os.path.exists(inside)

    await fc.stop_sandbox()
    assert not running(pid)
    assert not os.path.exists(jail_dir), "jail left behind"
    assert not os.path.exists(fc.vm_dir)
    assert os.path.exists(disk)  # the user's disk is untouched
    assert not any(
        os.path.exists(os.path.join(CGROUP_ROOT, c, "firecracker", "fc-jail"))
        for c in os.listdir(CGROUP_ROOT)
    )
    assert open_fds() == fds


async def test_jailed_template_and_clone(
    jailed: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
) -> None:
    state = os.path.join(short_tmp, "tpl", "state")
    mem = os.path.join(short_tmp, "tpl", "mem")
    template = await _start(
        jailed, fc_kernel, short_tmp, "fc-jtpl",
        boot_to_be_template=True, memory_path=mem, devices_state_path=state,
    )  # fmt: skip
    try:
        await template.pause_sandbox()
        await template.save_sandbox()
    finally:
        await template.stop_sandbox()
    assert os.path.getsize(mem) == 128 << 20
    clone = await _start(
        jailed, fc_kernel, short_tmp, "fc-jclone",
        boot_from_template=True, memory_path=mem, devices_state_path=state,
    )  # fmt: skip
    try:
        assert clone.api is not None
        assert (await clone.api.describe())["state"] == "Running"
        assert os.path.exists(clone.vsock_path)
    finally:
        await clone.stop_sandbox()
    assert not os.path.exists(os.path.join(short_tmp, "jail", "firecracker", "fc-jclone"))
    assert os.path.exists(mem) and os.path.exists(state)  # the template outlives its clones


def ids_of(pid: int) -> tuple[int, int]:
    """The real uid and gid of `pid`."""
    with open(f"/proc/{pid}/status") as f:
        lines = dict(line.split(":", 1) for line in f)
    return int(lines["Uid"].split()[0]), int(lines["Gid"].split()[0])


@pytest.mark.parametrize("runas", ["", "daemon"])
async def test_jailed_firecracker_runs_unprivileged_with_private_files(
    jailed: Backend,
    fc_kernel: tuple[str, str],  # noqa: F811
    short_tmp: str,  # noqa: F811
    runas: str,
) -> None:
    """The jailer drops Firecracker to the `runas` user of hypervisor_params (nobody by
    default), never the manager's root; its root and sockets are that user's alone, even
    under umask 002."""
    cfg = {"hypervisor_params": [Param("runas", runas)]} if runas else {}
    user = pwd.getpwnam(runas or "nobody")
    uid, gid = user.pw_uid, user.pw_gid
    assert uid != 0
    old = os.umask(0o002)
    try:
        fc = await _start(jailed, fc_kernel, short_tmp, "fc-ids", **cfg)
    finally:
        os.umask(old)
    try:
        assert fc.root is not None
        assert ids_of(fc.get_pids()[0]) == (uid, gid)
        for path in (fc.root.path, fc.api_socket):
            st = os.stat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode) & 0o077) == (uid, 0), path
        for path in (fc.vm_dir, os.path.dirname(fc.jailer.jail_dir("fc-ids"))):  # type: ignore[union-attr]
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path
    finally:
        await fc.stop_sandbox()
