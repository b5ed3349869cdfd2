"""`Sandbox.copy_out` writes guest bytes only to the file it was asked to write.

The bytes come from the guest and the destination is often in a directory other users can
write (/tmp): a link planted where the temp file will be must not redirect the write.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from virtcontainers import ConfigError
from virtcontainers.sandbox import Sandbox

MOCK_CFG = {"kernel_path": "/boot/vmlinuz", "initrd_path": "/boot/initrd.img"}
GUEST_BYTES = b"root::0:0:owned by the guest\n"


@pytest.fixture
def sandbox(run_root: str) -> Sandbox:
    sb = Sandbox("copy", "mock", run_root=run_root, **MOCK_CFG)

    async def read_file(guest_path: str) -> bytes:
        return GUEST_BYTES

    sb.read_file = read_file  # type: ignore[method-assign]
    return sb


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir(mode=0o1777)
    return d


async def test_copy_out_ignores_a_link_planted_at_the_temp_name(
    sandbox: Sandbox, shared: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "shadow"
    victim.write_bytes(b"secret\n")
    dest = shared / "out"
    (shared / "out.vc-tmp").symlink_to(victim)  # the name the copy used to write through
    await sandbox.copy_out("/etc/passwd", str(dest))
    assert victim.read_bytes() == b"secret\n"
    assert dest.read_bytes() == GUEST_BYTES and not dest.is_symlink()
    assert sorted(os.listdir(shared)) == ["out", "out.vc-tmp"]  # no temp file left


async def test_copy_out_replaces_a_link_at_the_destination_not_its_target(
    sandbox: Sandbox, shared: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "shadow"
    victim.write_bytes(b"secret\n")
    dest = shared / "out"
    dest.symlink_to(victim)
    old_umask = os.umask(0o022)
    try:
        await sandbox.copy_out("/etc/passwd", str(dest))
    finally:
        os.umask(old_umask)
    assert victim.read_bytes() == b"secret\n"
    assert not dest.is_symlink() and dest.read_bytes() == GUEST_BYTES
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644  # like any new file: 0666 & ~umask


async def test_copy_out_failure_names_the_file_and_leaves_no_temp(
    sandbox: Sandbox, shared: Path
) -> None:
    (shared / "out").mkdir()
    with pytest.raises(ConfigError, match=f"cannot write host file {shared}/out"):
        await sandbox.copy_out("/etc/passwd", str(shared / "out"))
    assert os.listdir(shared) == ["out"]
    with pytest.raises(ConfigError, match="cannot write host file"):
        await sandbox.copy_out("/etc/passwd", str(shared / "missing" / "out"))
