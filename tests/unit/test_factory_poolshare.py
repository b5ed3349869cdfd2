"""A pooled VM's staged shares on the host (real mounts in a temporary directory: root), their
release (never deleting through a volume's bind), the ledger's clean-up of a dead server's
shares, and the guest script of a container whose root and volumes are in the shares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtcontainers.containers import Container, ContainerRecord
from virtcontainers.containers.container import GUEST_POOL, GUEST_POOL_VOLUMES
from virtcontainers.drivers.virtiofsd import ROOT_CACHE
from virtcontainers.factory import ledger as ledger_mod
from virtcontainers.factory import poolshare
from virtcontainers.factory.tmpfs import mounts_under
from virtcontainers.factory.vmconfig import VMConfig
from virtcontainers.sandbox import build_config
from virtcontainers.types import HypervisorType

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@pytest.fixture
def area(tmp_path: Path) -> str:
    return poolshare.share_dir(str(tmp_path), "fvm-test")


def in_new_namespace(path: str) -> subprocess.Popen[bytes]:
    """A process in a mount namespace copied now, its mounts slaves of ours (as virtiofsd's)."""
    return subprocess.Popen(
        ["unshare", "-m", "--propagation", "slave", "--", sys.executable, "-c", "input()"],
        stdin=subprocess.PIPE,
    )


@root_only
def test_mounts_made_after_a_namespace_copy_reach_it_read_only_stays(
    area: str, tmp_path: Path
) -> None:
    """What the guest sees through virtiofsd: its namespace was copied before hand-out."""
    roots, volumes = poolshare.prepare(area)
    assert (roots.source, roots.mount_tag) == (poolshare.served(area), poolshare.TAG)
    assert (volumes.source, volumes.mount_tag) == (
        poolshare.served_volumes(area),
        poolshare.VOLUMES_TAG,
    )
    # The roots' daemon keeps the guest's caches; the volumes' has the config's mode.
    assert (roots.cache, volumes.cache) == (ROOT_CACHE, "")
    rw, ro, lower = tmp_path / "rw", tmp_path / "ro", tmp_path / "lower"
    for d in (rw, ro, lower):
        d.mkdir()
    (lower / "from-image").write_text("img")
    proc = in_new_namespace(area)
    try:
        assert poolshare.stage_root(area, lower=str(lower)) == f"{GUEST_POOL}/ctr"
        assert poolshare.stage_volume(area, "v0", str(rw), False) == f"{GUEST_POOL_VOLUMES}/v0"
        poolshare.stage_volume(area, "v1", str(ro), True)
        seen = f"/proc/{proc.pid}/root{poolshare.served(area)}"
        seen_volumes = f"/proc/{proc.pid}/root{poolshare.served_volumes(area)}"
        assert os.listdir(seen) == ["ctr"] and sorted(os.listdir(seen_volumes)) == ["v0", "v1"]
        assert Path(seen, "ctr", "from-image").read_text() == "img"
        Path(seen, "ctr", "new").write_text("x")
        assert (Path(area) / "ctr.upper" / "new").exists()  # writes go to the upper dir
        Path(seen_volumes, "v0", "f").write_text("rw")
        assert (rw / "f").read_text() == "rw"
        with pytest.raises(OSError, match="Read-only"):
            Path(seen_volumes, "v1", "f").write_text("ro")
        with pytest.raises(FileExistsError):
            poolshare.stage_volume(area, "v0", str(rw), False)  # names are never reused
    finally:
        proc.communicate(b"\n")
        poolshare.release(area)
    assert mounts_under(str(tmp_path)) == []
    assert not os.path.exists(area) and (rw / "f").read_text() == "rw"


@root_only
def test_release_never_deletes_through_a_mount_it_cannot_remove(
    area: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poolshare.prepare(area)
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "precious").write_text("keep")
    poolshare.stage_volume(area, "v0", str(vol), False)
    monkeypatch.setattr(poolshare.tmpfs, "unmount", lambda path: None)
    with pytest.raises(OSError, match="still mounted"):
        poolshare.release(area)
    assert (vol / "precious").read_text() == "keep"
    monkeypatch.undo()
    poolshare.release(area)
    assert (vol / "precious").read_text() == "keep" and not os.path.exists(area)


@root_only
def test_a_dead_servers_ledger_releases_its_staged_shares(tmp_path: Path) -> None:
    run_root = str(tmp_path)
    path = os.path.join(run_root, "pool.json")
    led = ledger_mod.Ledger(path, run_root)
    led.add("fvm-a")
    poolshare.prepare(poolshare.share_dir(run_root, "fvm-a"))
    doc = Path(path).read_text().replace(f'"owner": {os.getpid()}', '"owner": 0')
    Path(path).write_text(doc)
    assert ledger_mod.reap(path) == ["fvm-a"]
    assert mounts_under(run_root) == [] and not os.path.exists(f"{run_root}/pool")


def test_only_qemu_vms_made_for_containers_are_staged() -> None:
    fs = build_config(None, {"shared_fs": "virtio-fs"}, HypervisorType.QEMU)
    assert poolshare.wanted(VMConfig(HypervisorType.QEMU, fs))
    assert not poolshare.wanted(VMConfig(HypervisorType.CLH, fs))
    plain = build_config(None, {}, HypervisorType.QEMU)
    assert not poolshare.wanted(VMConfig(HypervisorType.QEMU, plain))


def test_a_staged_container_binds_its_root_and_volumes_from_the_share() -> None:
    record = ContainerRecord(
        id="c1",
        share_tag=poolshare.TAG,
        share_id=poolshare.SHARE_ID,
        share_path=f"{GUEST_POOL}/ctr",
        spec={"args": ["true"]},
        volumes=[
            {
                "source": "/h/a",
                "destination": "/a",
                "read_only": True,
                "tag": "vc-v0",
                "file": "",
                "guest": f"{GUEST_POOL_VOLUMES}/vc-v0",
            },
        ],
    )
    c = Container(None, record)  # type: ignore[arg-type]
    # Nothing to mount before vc-run, which enters the staged root itself: no set-up script.
    assert c.setup_script() == ""
    assert c.root == f"{GUEST_POOL}/ctr"
    assert ("bind", f"{GUEST_POOL_VOLUMES}/vc-v0", "/a", "rbind,ro") in c._volume_mounts()
