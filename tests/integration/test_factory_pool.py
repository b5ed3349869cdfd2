"""Pooled VMs with staged shares (real QEMU, TCG): the VM cache attaches and mounts two
virtio-fs shares per VM while it waits in the pool (roots with cache=always, volumes with the
config's mode); at hand-out the container's root and volumes are mounted under them on the
host and reach the guest by mount propagation, with no device hot-added. Read-only volumes
stay read-only, one VM never sees another's files, and stopping (or a dead cache server)
leaves no mount, directory or process behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from virtcontainers import host, persist
from virtcontainers.containers.container import (
    POOL_CGROUP,
    READ_AHEAD_KIB,
    WARM_CGROUP,
    WARM_ROOT,
    warm_up_script,
)
from virtcontainers.containers.copy import copy_out
from virtcontainers.containers.spec import DEVICE_PROGRAMS
from virtcontainers.drivers.qemu.driver import QemuHypervisor
from virtcontainers.factory import Factory, TemplateStore, adopt_vm, poolshare, sandbox_from_factory
from virtcontainers.factory.base import TemplateBase
from virtcontainers.factory.daemon import (
    DaemonSpec,
    daemon_status,
    read_pid_file,
    start_daemon,
    stop_daemon,
)
from virtcontainers.factory.tmpfs import mounts_under
from virtcontainers.images import ImageStore
from virtcontainers.sandbox import Sandbox, build_config
from virtcontainers.types import HypervisorType

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]


CFG = build_config(None, {"memory_size": 256, "shared_fs": "virtio-fs"}, HypervisorType.QEMU)


async def _no_hotplug(device: Any) -> Any:
    raise AssertionError(f"a device was hot-added at hand-out: {device!r}")


async def test_pooled_vms_take_containers_without_hotplug(
    run_root: str, guest_assets: Any, images: ImageStore, tmp_path: Path
) -> None:
    store = TemplateStore(run_root=run_root)
    await store.create("pool", CFG)
    factory = await Factory.cached(TemplateBase(store, "pool"), 2, run_root=run_root)
    sandboxes: list[Sandbox] = []
    try:
        await factory.base.wait_full(240)  # type: ignore[attr-defined]
        staged = [os.path.join(run_root, "pool", d) for d in os.listdir(f"{run_root}/pool")]
        assert len(staged) == 2
        served = [f(d) for d in staged for f in (poolshare.served, poolshare.served_volumes)]
        assert sorted(mounts_under(f"{run_root}/pool")) == sorted(served)
        volumes = []
        for name in ("a", "b"):
            rw, ro = tmp_path / f"{name}-rw", tmp_path / f"{name}-ro"
            rw.mkdir()
            ro.mkdir()
            (ro / "given").write_text(name)
            vm = await factory.get_vm(CFG)
            assert vm.share_dir in staged
            # Its two daemons: the roots' keeps the guest's caches, the volumes' has `auto`.
            modes = {}
            for pid in vm.hypervisor.helpers.pids("virtiofsd"):  # type: ignore[attr-defined]
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                opts = dict(a.split(b"=", 1) for a in argv if a.startswith((b"source=", b"cache=")))
                modes[os.fsdecode(opts[b"source"])] = opts[b"cache"]
            assert modes == {
                poolshare.served(vm.share_dir): b"always",
                poolshare.served_volumes(vm.share_dir): b"auto",
            }
            vm.hypervisor.hotplug_add_device = _no_hotplug  # type: ignore[method-assign]
            sb = await adopt_vm(
                vm,
                run_root=run_root,
                image="busybox",
                image_store=images.root,
                mounts=[f"{rw}:/rw", f"{ro}:/ro:ro"],
            )
            sandboxes.append(sb)
            await sb.share_workload()
            volumes.append((rw, ro))
            # The pool's warm-up container (run while the VM waited) left nothing behind.
            traces = f"ls -d {WARM_ROOT} {WARM_CGROUP}; grep -c {WARM_ROOT} /proc/mounts"
            left = await sb.exec(["/bin/sh", "-c", traces])
            assert left.stdout == b"0\n", left
            # The roots' share reads ahead READ_AHEAD_KIB (FUSE's default is 128).
            bdi = (
                "cat /sys/class/bdi/$(awk '$5 == \"/run/vc/pool\" {print $3}' /proc/self/mountinfo)"
            )
            ahead = await sb.exec(["/bin/sh", "-c", f"{bdi}/read_ahead_kb"])
            assert ahead.stdout == f"{READ_AHEAD_KIB}\n".encode(), ahead
            # ... and left a default spec's device program pinned for the hand-out's container.
            pins = await sb.exec(["/bin/sh", "-c", f"ls {DEVICE_PROGRAMS}/bpf | grep -c ^dev-"])
            assert pins.stdout == b"1\n", pins
            # ... and made the cgroup its first container takes, unused so far.
            fresh = await sb.exec(["/bin/sh", "-c", f"head -1 {POOL_CGROUP}/cpu.stat"])
            assert fresh.stdout == b"usage_usec 0\n", fresh
        # The warm-up really is a container's start: vc-run (stamping its phases, as
        # VC_RUN_TRACE asks) attached a device program, made the namespaces, entered the
        # root, ran `true`, reaped it.
        warm = await sandboxes[0].exec(
            ["/bin/sh", "-c", warm_up_script()], env={"VC_RUN_TRACE": "1"}
        )
        assert warm.exit_code == 0, warm
        lines = warm.stderr.decode().splitlines()
        stamps = sorted((line.split()[1:] for line in lines), key=lambda s: float(s[0]))
        assert [what for _, _, what in stamps] == [
            "main",
            "checked",
            "devices",
            "unshared",
            "forked",
            "proc",
            "dev",
            "sys",
            "rooted",
            "exec",
            "reaped",
        ], warm
        # Two processes: vc-run waiting outside, the container's first inside its own pid ns.
        assert len({pid for _, pid, _ in stamps}) == 2

        script = (
            "ls / | tr '\\n' ' '; echo; cat /ro/given; echo; echo mine > /rw/new; "
            "echo secret-$(hostname) > /only-here; "
            "if echo x > /ro/x 2>/dev/null; then echo ro-writable; else echo ro-refused; fi"
        )
        for sb, (rw, ro), name in zip(sandboxes, volumes, "ab", strict=True):
            container = await sb.create_container(["sh", "-c", script])
            result = await container.run()
            assert result.exit_code == 0, result
            listing, given, verdict = result.stdout.decode().splitlines()
            assert "bin" in listing.split() and "only-here" not in listing.split()
            assert (given, verdict) == (name, "ro-refused")
            assert (rw / "new").read_text() == "mine\n"
            # It ran in the cgroup made while the VM waited: no cgroup of its own was made.
            assert container.cgroup == POOL_CGROUP
            used = await sb.exec(
                ["/bin/sh", "-c", f"head -1 {POOL_CGROUP}/cpu.stat; ls -d /sys/fs/cgroup/vc-*"]
            )
            assert used.stdout.startswith(b"usage_usec ") and used.stdout.split()[1] != b"0", used
            assert used.stdout.count(b"\n") == 1, used
            assert not (ro / "x").exists()
            # Read-only on the host side too: the guest itself cannot write through the share.
            guest_ro = await sb.exec(["/bin/sh", "-c", "echo x > /run/vc/poolv/vc-v1/y"])
            assert guest_ro.exit_code != 0 and b"Read-only" in guest_ro.stderr, guest_ro
            assert not (ro / "y").exists()
            # `virtc cp` finds the root in the share its virtiofsd serves.
            root, where, read_only = container.locate("/only-here", persist.vm_dir(sb.id, run_root))
            copy_out(root, where, str(tmp_path / f"{name}-copied"))
            assert (tmp_path / f"{name}-copied").read_text() == f"secret-{sb.id}\n"
            assert not read_only

        # A second container in the same VM: its root is staged too (ctr1), then taken out.
        first = sandboxes[0]
        second = await first.create_container(
            ["sh", "-c", "cat /only-here; echo 2 > /two; cat /proc/self/cgroup"]
        )
        assert (await second.run()).stdout == f"0::/vc-{second.id}\n".encode()
        staged = os.path.join(poolshare.served(first.workload["share_dir"]), "ctr1")
        assert staged in mounts_under(staged)
        assert (Path(staged) / "two").read_text() == "2\n"
        await second.delete()
        assert not os.path.exists(staged) and mounts_under(staged) == []

        # Each VM's share holds its own container's files only.
        for sb in sandboxes:
            seen = await sb.exec(
                ["/bin/sh", "-c", "ls /run/vc/pool /run/vc/poolv; cat /run/vc/pool/ctr/only-here"]
            )
            assert seen.stdout.decode().split() == [
                "/run/vc/pool:", "ctr", "/run/vc/poolv:", "vc-v0", "vc-v1", f"secret-{sb.id}"
            ]  # fmt: skip
        # Deleting the first container removes the pool's cgroup with it; the second's is gone.
        await first.containers[first.id].delete()
        cgroups = await first.exec(["/bin/sh", "-c", "ls -d /sys/fs/cgroup/vc*"])
        assert cgroups.stdout == b"", cgroups
    finally:
        for sb in sandboxes:
            await sb.stop()
        await factory.close()
        store.remove("pool")
    assert mounts_under(run_root) == []  # the template's tmpfs too: it was removed
    assert not os.path.exists(os.path.join(run_root, "pool"))
    assert Sandbox.list(run_root) == []


async def test_a_dead_cache_server_leaves_no_staged_share(run_root: str, guest_assets: Any) -> None:
    store = TemplateStore(run_root=run_root)
    await store.create("pool", CFG)
    try:
        pid = await start_daemon(DaemonSpec(size=1, template="pool"), run_root=run_root)
        for _ in range(2400):
            if (await daemon_status(run_root)).vms:
                break
            await asyncio.sleep(0.1)
        assert len(mounts_under(os.path.join(run_root, "pool"))) == 2  # roots, volumes
        watcher = read_pid_file(run_root)[2]
        os.kill(pid, signal.SIGKILL)
        for _ in range(300):
            if not host.pid_is(watcher, None) and not os.path.exists(f"{run_root}/pool"):
                break
            await asyncio.sleep(0.1)
        assert mounts_under(os.path.join(run_root, "pool")) == []
        assert not os.path.exists(os.path.join(run_root, "pool"))
    finally:
        await stop_daemon(run_root)
        store.remove("pool")


async def test_a_bundle_from_the_cache_server_is_staged_not_hot_added(
    run_root: str,
    guest_assets: Any,
    images: ImageStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shim's path: a bundle (read-only root, a file bound from a directory) in a VM
    handed out by the cache server over gRPC, which names the VM's staged share; a process
    that attaches to the sandbox later releases it when it stops the sandbox."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copytree(images.rootfs(images.get("busybox")), bundle / "rootfs", symlinks=True)
    files = tmp_path / "files"
    files.mkdir()
    (files / "resolv.conf").write_text("nameserver 192.0.2.1\n")
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "args": ["sh", "-c", "cat /etc/resolv.conf; hostname; touch /x || echo root-ro"],
            "env": ["PATH=/bin"],
            "cwd": "/",
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "bundled",
        "mounts": [
            {
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": str(files / "resolv.conf"),
                "options": ["rbind", "ro"],
            }
        ],
    }
    (bundle / "config.json").write_text(json.dumps(config))
    store = TemplateStore(run_root=run_root)
    await store.create("pool", CFG)
    try:
        await start_daemon(DaemonSpec(size=1, template="pool"), run_root=run_root)
        monkeypatch.setattr(QemuHypervisor, "hotplug_add_device", _no_hotplug)
        sb = await sandbox_from_factory(
            CFG, use_cache=True, run_root=run_root, bundle=str(bundle), timeout=240
        )
        try:
            assert sb.workload["share_dir"] == os.path.join(run_root, "pool", sb.id)
            result = await (await sb.create_container()).run()
            assert result.stdout.decode().splitlines() == [
                "nameserver 192.0.2.1",
                "bundled",
                "root-ro",
            ], result
            # Another process (as `virtc stop`, or containerd's delete) stops it from its record.
            await sb.detach()
            sb = await Sandbox.attach(sb.id, run_root)
        finally:
            await sb.stop()
        assert not os.path.exists(os.path.join(run_root, "pool", sb.id))
        assert (bundle / "rootfs" / "bin" / "busybox").exists()  # released, never deleted
    finally:
        await stop_daemon(run_root)
        store.remove("pool")
    assert mounts_under(run_root) == []
