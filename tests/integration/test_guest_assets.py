"""Real guest asset builds: Debian kernel package, busybox, gcc, cpio, under a process lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from virtcontainers.guest import asset_info, ensure_assets

pytestmark = pytest.mark.integration

BUILD = (
    "import json, sys\n"
    "from virtcontainers.guest import ensure_assets\n"
    "a = ensure_assets(sys.argv[1])\n"
    "print(json.dumps({'key': a.key, 'built': a.built, 'kernel': a.kernel, 'initrd': a.initrd}))\n"
)


@pytest.fixture
def cache_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vc-assets-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_two_processes_build_once_then_reuse(cache_dir: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, cache_dir], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        outs.append(json.loads(out))
    assert sorted(o["built"] for o in outs) == [False, True]
    assert outs[0]["key"] == outs[1]["key"]
    leftovers = [n for n in os.listdir(cache_dir) if n.startswith((".build-", ".old-"))]
    assert leftovers == []

    again = ensure_assets(cache_dir)
    assert not again.built and again.key == outs[0]["key"]
    with open(again.initrd, "rb") as f:
        assert f.read(4) in (b"\x02\x21\x4c\x18", b"\x1f\x8b\x08\x00")  # lz4 legacy or gzip
    with open(again.kernel, "rb") as f:
        f.seek(0x202)
        assert f.read(4) == b"HdrS"  # a bzImage
    assert again.kernel_version and "virtio_console" in again.modules

    info = asset_info(cache_dir)
    assert info["status"] == "built" and info["key"] == again.key
    assert info["initrd_size"] == os.path.getsize(again.initrd)
    assert info["kernel_package"].startswith("linux-image-")
