"""virtiofsd's command line for a container's root (an overlay) and a read-only volume: both
made in the daemon's own mount namespace, so the guest cannot write through them."""

from __future__ import annotations

import os

import pytest

from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import SharedFS
from virtcontainers.drivers import virtiofsd
from virtcontainers.errors import ConfigError


def test_overlay_and_read_only_shares(tmp_path: object) -> None:
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root")
    cfg = HypervisorConfig()
    root = SharedFS(id="ctr", source="/vm/ctr/upper", mount_tag="t", lower="/store/rootfs/x")
    argv = virtiofsd.argv(cfg, "qemu", root, "/vm/s.sock")
    assert argv[:5] == ["unshare", "-m", "--propagation", "private", "--"]
    assert "mount -t overlay" in argv[7] and argv[9:11] == ["/store/rootfs/x", "/vm/ctr/upper"]
    assert "source=/vm/ctr/upper.merged" in argv
    assert "metacopy" not in argv[7]
    shifted = SharedFS(id="ctr", source="/u", mount_tag="t", lower="/l", id_shift=100000)
    script = virtiofsd.argv(cfg, "qemu", shifted, "/vm/s.sock")[7]
    assert 'workdir=$2.work,metacopy=on"' in script and 'mkdir -p "$2.work" ' in script
    stacked = SharedFS(
        id="ctr", source="/u", mount_tag="t", lower="/l", id_shift=100000, shifted="/l.shift"
    )
    assert virtiofsd.argv(cfg, "qemu", stacked, "/vm/s.sock")[9:11] == ["/l.shift:/l", "/u"]
    with pytest.raises(ConfigError, match="shifted needs lower and id_shift"):
        SharedFS(id="ctr", source="/u", mount_tag="t", lower="/l", shifted="/l.shift")
    bad_layer = SharedFS(
        id="ctr", source="/u", mount_tag="t", lower="/l", id_shift=1, shifted="/a:b"
    )
    with pytest.raises(ConfigError, match="contains ',' ':' or a newline"):
        virtiofsd.argv(cfg, "qemu", bad_layer, "/vm/s.sock")
    ro = SharedFS(id="v0", source="/data", mount_tag="v", read_only=True)
    argv = virtiofsd.argv(cfg, "qemu", ro, "/vm/v.sock")
    assert "remount,bind,ro" in argv[7] and argv[9] == "/data"
    plain = SharedFS(id="v1", source="/data", mount_tag="w")
    assert virtiofsd.argv(cfg, "qemu", plain, "/vm/w.sock")[0].endswith("virtiofsd")
    bad = SharedFS(id="v2", source="/da:ta", mount_tag="x", read_only=True)
    with pytest.raises(ConfigError, match="contains ',' ':' or a newline"):
        virtiofsd.argv(cfg, "qemu", bad, "/vm/x.sock")
