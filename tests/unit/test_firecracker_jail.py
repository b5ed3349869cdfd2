"""The VM root: files brought in by hard link, bind mount (shared, across filesystems) or copy,
released and removed without touching the originals; cgroup cleanup."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtcontainers.drivers.firecracker.jail import VMRoot, cgroup_version, remove_cgroups


@pytest.fixture
def root(tmp_path: Path) -> VMRoot:
    r = VMRoot(str(tmp_path / "root"))
    r.create()
    return r


@pytest.fixture
def other_fs() -> Iterator[str]:
    """A directory on another filesystem than /tmp (tmpfs /dev/shm), to force EXDEV."""
    if os.stat("/dev/shm").st_dev == os.stat(tempfile.gettempdir()).st_dev:
        pytest.skip("/dev/shm and the temp dir share a filesystem")
    d = tempfile.mkdtemp(prefix="fcj-", dir="/dev/shm")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_same_filesystem_is_hard_linked(root: VMRoot, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(b"data")
    rel = root.bring(str(src), "drives/disk_0", shared=True)
    assert rel == "drives/disk_0"
    assert os.path.samefile(root.host(rel), src)
    root.release(rel)
    assert not os.path.exists(root.host(rel)) and src.read_bytes() == b"data"


def test_other_filesystem_copy_when_not_shared(root: VMRoot, other_fs: str) -> None:
    src = Path(other_fs) / "vmlinux"
    src.write_bytes(b"kernel")
    rel = root.bring(str(src), "vmlinux", shared=False)
    assert Path(root.host(rel)).read_bytes() == b"kernel"
    assert not os.path.samefile(root.host(rel), src)
    assert root.mounts == []


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_other_filesystem_bind_mount_when_shared(root: VMRoot, other_fs: str) -> None:
    src = Path(other_fs) / "disk.img"
    src.write_bytes(b"disk")
    rel = root.bring(str(src), "drives/disk_1", shared=True)
    dest = root.host(rel)
    assert dest in root.mounts
    Path(dest).write_bytes(b"written through the jail")
    assert src.read_bytes() == b"written through the jail"  # same file, not a copy
    root.remove()
    assert root.mounts == [] and not os.path.exists(root.path)
    assert src.read_bytes() == b"written through the jail"  # unmounted before deleting


def test_touch_and_remove(root: VMRoot) -> None:
    path = root.touch("drives/pool_0", 0o660)
    assert os.path.getsize(path) == 0 and (os.stat(path).st_mode & 0o777) == 0o660
    root.remove()
    assert not os.path.exists(root.path)


def test_missing_source_is_an_error(root: VMRoot, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="cannot link"):
        root.bring(str(tmp_path / "nope"), "x", shared=True)


def test_remove_cgroups(tmp_path: Path) -> None:
    for controller in ("cpu", "memory"):
        (tmp_path / controller / "vc" / "vm1").mkdir(parents=True)
    (tmp_path / "cpu" / "vc" / "vm2").mkdir()
    remove_cgroups("vc", "vm1", root=str(tmp_path))
    assert not (tmp_path / "memory" / "vc").exists()  # parent emptied: removed
    assert not (tmp_path / "cpu" / "vc" / "vm1").exists()
    assert (tmp_path / "cpu" / "vc" / "vm2").exists()  # another VM's cgroup stays


def test_cgroup_version(tmp_path: Path) -> None:
    assert cgroup_version(str(tmp_path)) == 1
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert cgroup_version(str(tmp_path)) == 2
