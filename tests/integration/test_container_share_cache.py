"""The cache modes of a container's shares on real QEMU (TCG): its root served with
`cache=always` (the guest keeps what it read), its volumes with the config's mode (`auto`:
a host's in-place change is seen at once), and `Container.copy_in` (`virtc cp`) over files
the guest already read or looked up still seen at once, over a file the container holds
open within ROOT_TIMEOUT s."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from virtcontainers import Sandbox, persist
from virtcontainers.containers.copy import share_root
from virtcontainers.drivers.virtiofsd import ROOT_CACHE
from virtcontainers.images import ImageStore

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("leak_check")]


def virtiofsd_sources(sb: Sandbox) -> dict[str, bytes]:
    """{source directory: cache option} of each virtiofsd of the sandbox's VM."""
    out = {}
    for pid in sb.hypervisor.helpers.pids("virtiofsd"):  # type: ignore[attr-defined]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        opts = dict(a.split(b"=", 1) for a in argv if a.startswith((b"source=", b"cache=")))
        out[os.fsdecode(opts[b"source"])] = opts[b"cache"]
    return out


async def test_root_cached_volumes_coherent_and_cp_seen(
    run_root: str, images: ImageStore, tmp_path: Path
) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "v.txt").write_text("written on the host\n")
    for name, text in (("first", "first\n"), ("third", "third\n"), ("new", "made\n")):
        (tmp_path / name).write_text(text)
    sb = Sandbox(
        image="busybox", image_store=images.root, mounts=[f"{vol}:/vol"], run_root=run_root
    )
    async with sb:
        # The container holds /held.txt open from its start: the guest keeps its name in use.
        c = await sb.create_container(["sh", "-c", "exec 3< /held.txt; exec sleep 600"])
        await c.copy_in(str(tmp_path / "first"), "/held.txt")
        await c.start(detach=True)
        # Two daemons: the root's (its overlay's merged directory) `always`, the volume's `auto`.
        modes = virtiofsd_sources(sb)
        assert modes.pop(str(vol)) == b"auto", modes
        [(root_source, root_mode)] = modes.items()
        assert root_source.endswith(".merged") and root_mode == ROOT_CACHE.encode()

        async def cat(path: str) -> bytes:
            result = await c.exec(["cat", path])
            return result.stdout if result.exit_code == 0 else b"<missing> " + result.stderr

        # The volume: rewritten in place on the host (same size, same inode), seen at once.
        assert await cat("/vol/v.txt") == b"written on the host\n"
        (vol / "v.txt").write_text("changed on the host\n")
        assert await cat("/vol/v.txt") == b"changed on the host\n"

        # The root: a file the guest has read keeps its pages across opens. Changed in place
        # behind the share (same size), the guest still reads what it read: only its cache
        # can answer that.
        await c.copy_in(str(tmp_path / "first"), "/data.txt")
        assert await cat("/data.txt") == b"first\n"
        root = share_root(persist.vm_dir(sb.id, run_root))
        with open(f"{root}/data.txt", "r+") as f:
            f.write("other\n")
        assert await cat("/data.txt") == b"first\n"

        # `cp` over the file the guest read, and to a name it looked up and did not find in
        # a directory it listed (the container's root, in use): all seen right after the
        # copy returns.
        assert (await cat("/made.txt")).startswith(b"<missing>")
        assert b"made.txt" not in (await c.exec(["ls", "/"])).stdout
        await c.copy_in(str(tmp_path / "third"), "/data.txt")
        await c.copy_in(str(tmp_path / "new"), "/made.txt")
        assert await cat("/data.txt") == b"third\n"
        assert await cat("/made.txt") == b"made\n"
        assert b"made.txt" in (await c.exec(["ls", "/"])).stdout

        # A name the guest holds in use is not dropped: it is looked up again after
        # ROOT_TIMEOUT s, and the copy that replaced the file is seen then.
        assert await cat("/held.txt") == b"first\n"
        await c.copy_in(str(tmp_path / "third"), "/held.txt")
        for _ in range(50):
            if await cat("/held.txt") == b"third\n":
                break
            await asyncio.sleep(0.1)
        assert await cat("/held.txt") == b"third\n"
        await c.kill(signal.SIGKILL)
        await c.wait()
