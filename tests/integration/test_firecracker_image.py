"""An image on Firecracker (no virtio-fs): the container's root becomes an ext4 image built
without mounting and attached as a drive, against the real Firecracker binary's API. The
guest side (mounting it, running the container) needs a host whose KVM runs guests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fc_support import fc_kernel, make_config, real_backend, short_tmp  # noqa: F401 - fixtures

from virtcontainers import Sandbox, host
from virtcontainers.errors import UnsupportedError, VCError
from virtcontainers.images import ImageStore
from virtcontainers.images.build import busybox_image

pytestmark = [pytest.mark.integration]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ImageStore]:
    s = ImageStore(str(tmp_path / "images"))
    s.import_archive(busybox_image())
    yield s
    assert os.listdir(os.path.join(s.root, "leases")) == [], "the image lease was kept"


async def test_image_root_as_ext4_drive(
    short_tmp: str,  # noqa: F811
    fc_kernel: tuple[str, str],  # noqa: F811
    store: ImageStore,
) -> None:
    cfg = make_config(real_backend(), fc_kernel)
    sb = Sandbox(
        "fcimg",
        "firecracker",
        cfg,
        run_root=short_tmp,
        image="busybox",
        image_store=store.root,
        start_timeout=5 if not host.kvm_usable() else 60,
    )
    await sb.create()
    try:
        ext4 = os.path.join(short_tmp, "vm", "fcimg", "ctr.ext4")
        listing = subprocess.run(
            ["debugfs", "-R", "ls -p /bin", ext4], capture_output=True, text=True, check=True
        ).stdout
        assert "/busybox/" in listing  # the image's files, copied without mounting
        assert store.holders(store.get("busybox")) == ["fcimg"]
        if not host.kvm_usable():
            # The real Firecracker takes the drive (PUT /drives before InstanceStart); only
            # the guest cannot run here, so the start ends waiting for the agent.
            with pytest.raises(VCError, match=r"(?i)agent|time"):
                await sb.start()
            return
        await sb.start()
        c = await sb.create_container(["sh", "-c", "ls /bin/busybox && echo in-firecracker"])
        result = await c.run()
        assert result.stdout.split()[-1] == b"in-firecracker"
    finally:
        await sb.stop()
    assert not os.path.exists(os.path.join(short_tmp, "vm", "fcimg"))


async def test_volumes_refused_without_virtio_fs(
    short_tmp: str,  # noqa: F811
    fc_kernel: tuple[str, str],  # noqa: F811
    store: ImageStore,
    tmp_path: Path,
) -> None:
    cfg = make_config(real_backend(), fc_kernel)
    sb = Sandbox(
        "fcvol",
        "firecracker",
        cfg,
        run_root=short_tmp,
        image="busybox",
        image_store=store.root,
        mounts=[f"{tmp_path}:/data"],
    )
    with pytest.raises(UnsupportedError, match=r"shared directories \(-v\)"):
        await sb.create()
    assert not os.path.exists(os.path.join(short_tmp, "vm", "fcvol"))
