"""Containers on VMs from the factory (real QEMU, TCG): a template made for virtio-fs, clones
with the image's root and a volume hot-added; the VM cache server handing out such VMs; the
template's memory untouched by what virtiofsd and the clones write; nothing left behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from virtcontainers.errors import UnsupportedError
from virtcontainers.factory import TemplateStore, adopt_vm, factory_vm, sandbox_from_factory
from virtcontainers.images import ImageStore
from virtcontainers.sandbox import Sandbox, build_config
from virtcontainers.types import HypervisorType

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


async def test_template_clone_runs_an_image_container(
    run_root: str, guest_assets: Any, images: ImageStore, tmp_path: Path
) -> None:
    cfg = build_config(None, {"memory_size": 256, "shared_fs": "virtio-fs"}, HypervisorType.QEMU)
    store = TemplateStore(run_root=run_root)
    info = await store.create("ctr", cfg)
    try:
        before = digest(info.memory_path)
        out = tmp_path / "out"
        out.mkdir()
        sb = await sandbox_from_factory(
            cfg,
            template="ctr",
            run_root=run_root,
            image="busybox",
            image_store=images.root,
            mounts=[f"{out}:/out"],
        )
        try:
            assert images.holders(images.get("busybox")) == [sb.id]
            script = (
                "ls /bin/busybox && echo from-clone > /out/new.txt && "
                "dd if=/dev/urandom of=/scratch bs=1M count=8 2>/dev/null && "
                "wc -c < /scratch; exit 3"
            )
            c = await sb.create_container(["sh", "-c", script])
            result = await c.run()
            assert result.exit_code == 3, result
            assert result.stdout.decode().split() == ["/bin/busybox", str(8 << 20)]
            assert (out / "new.txt").read_text() == "from-clone\n"
            # The clone's memory is its own copy: neither the guest nor virtiofsd (which maps
            # it to move file data) wrote into the template's.
            assert digest(info.memory_path) == before
        finally:
            await sb.stop()
        assert Sandbox.list(run_root) == []
    finally:
        store.remove("ctr")


async def test_a_clone_without_shared_memory_refuses_a_container(
    run_root: str, guest_assets: Any, images: ImageStore
) -> None:
    """A template made without virtio-fs maps its clones' memory copy-on-write: virtiofsd
    could not see it, so hot-adding the container's root is refused, naming the fix."""
    cfg = build_config(None, {"memory_size": 256}, HypervisorType.QEMU)
    store = TemplateStore(run_root=run_root)
    await store.create("plain", cfg)
    try:
        vm = await factory_vm(cfg, template="plain", run_root=run_root)
        sb = await adopt_vm(vm, run_root=run_root, image="busybox", image_store=images.root)
        try:
            with pytest.raises(UnsupportedError, match="virtio-fs"):
                await sb.share_workload()
        finally:
            await sb.stop()
    finally:
        store.remove("plain")


async def virtc(run_root: str, images: ImageStore, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "virtcontainers.cli",
        "--run-root",
        run_root,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "VC_IMAGE_ROOT": images.root},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_virtc_run_image_from_the_vm_cache(
    run_root: str, guest_assets: Any, images: ImageStore
) -> None:
    """`virtc run --factory --image`: the cache server's VMs (cloned from a --virtio-fs
    template) take the container; QEMU's user-mode network, made at boot, is refused
    before a VM is taken."""
    code, _, err = await virtc(
        run_root, images, "template", "create", "t", "--virtio-fs", "--memory", "256"
    )
    assert code == 0, err
    try:
        code, _, err = await virtc(
            run_root, images, "factory", "init", "--template", "t", "--size", "1", "--wait"
        )
        assert code == 0, err
        run = ("run", "--memory", "256", "--factory", "--image", "busybox", "--")
        code, out, err = await virtc(run_root, images, *run, "sh", "-c", "echo hi; exit 5")
        assert (code, out) == (5, "hi\n"), err
        code, out, err = await virtc(run_root, images, "--json", "factory", "status")
        assert code == 0 and json.loads(out)["handed_out"] == 1, err
        code, _, err = await virtc(
            run_root, images, "run", "--factory", "--net", "user", "--image", "busybox", "true"
        )
        assert code == 2 and "--net user: a VM from the factory cannot take" in err, err
        code, out, err = await virtc(run_root, images, "--json", "factory", "status")
        assert code == 0 and json.loads(out)["handed_out"] == 1, err
    finally:
        await virtc(run_root, images, "factory", "destroy")
        await virtc(run_root, images, "template", "rm", "t")
    assert Sandbox.list(run_root) == []
