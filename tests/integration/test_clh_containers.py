"""An image sandbox on Cloud Hypervisor shares the container's root over virtio-fs through
the VMM's API (the `fs` list of `vm.create`), served by virtiofsd as an overlay of the image.

The real cloud-hypervisor cannot run here: the spec-validating fake stands in for it (it
checks every body against the OpenAPI spec and connects to each virtio-fs socket at boot).
virtiofsd is the real one. The fixture's leak check covers processes, sockets and files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_clh_driver import VIRTIOFSD, ClhEnv, fake, vm_info

from leaks import running
from virtcontainers import Sandbox
from virtcontainers.drivers import virtiofsd
from virtcontainers.drivers.clh import CloudHypervisor
from virtcontainers.images import ImageStore
from virtcontainers.images.build import busybox_image
from virtcontainers.persist import vm_dir

__all__ = ["fake"]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK), reason=f"{VIRTIOFSD} is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="an overlay share needs root (mount namespaces)"),
]


async def test_image_sandbox_shares_its_root_over_virtio_fs(fake: ClhEnv, tmp_path: Path) -> None:
    store = ImageStore(str(tmp_path / "images"))
    [image] = store.import_archive(busybox_image())
    lower = store.rootfs(image)
    # No shared_fs in the config: an image sandbox on CLH picks virtio-fs itself (not a block
    # image, which is for VMMs without it).
    sb = Sandbox(
        "clhimg",
        "clh",
        fake.config(shared_fs=""),
        run_root=fake.root,
        image="busybox",
        image_store=store.root,
    )
    await sb.create()
    try:
        hv = sb.hypervisor
        assert isinstance(hv, CloudHypervisor)
        await hv.start_sandbox(20)
        home = vm_dir("clhimg", fake.root)
        sock = virtiofsd.socket_path(home, "ctr")
        config = (await vm_info(hv.api_socket))["config"]
        assert config["fs"] == [
            {"tag": "vc-ctr", "socket": sock, "num_queues": 1, "queue_size": 1024, "id": "ctr"}
        ]
        assert config["memory"]["shared"] is True  # vhost-user needs it
        assert not [d for d in config.get("disks") or [] if d.get("id") == "ctr"]

        [_vmm, daemon] = hv.get_pids()
        argv = Path(f"/proc/{daemon}/cmdline").read_bytes().decode().split("\0")
        upper = os.path.join(home, "ctr", "upper")
        assert f"source={upper}.merged" in argv  # the overlay of the image and the upper
        assert f"cache={virtiofsd.ROOT_CACHE}" in argv  # a root: the guest keeps what it read
        # What virtiofsd serves (its root: it pivots into the share): the image's files; a
        # write lands in the sandbox's upper directory, never in the image store.
        served = f"/proc/{daemon}/root"
        assert set(os.listdir(served)) == set(os.listdir(lower))
        Path(served, "written").write_text("by the guest\n")
        assert Path(upper, "written").read_text() == "by the guest\n"
        assert not os.path.exists(os.path.join(lower, "written"))
    finally:
        await sb.stop()
        os.rmdir(os.path.join(fake.root, "sbs"))  # the (empty) state store: the rest is checked
    assert not running(daemon)
    assert not os.path.exists(sock)
    assert os.listdir(os.path.join(store.root, "leases")) == []  # its image lease too
