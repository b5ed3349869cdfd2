"""`virtc image import|ls|inspect|rm` as a user runs them: real `virtc` subprocesses on a
private store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from images_support import docker_archive, layer, oci_archive
from virtcontainers.images import ImageStore


def virtc(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VC_IMAGE_ROOT=store, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "virtcontainers.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture
def store(tmp_path: str) -> str:
    return os.path.join(str(tmp_path), "store")


def test_import_ls_inspect_rm(store: str, tmp_path: str) -> None:
    src = os.path.join(str(tmp_path), "img.tar")
    docker_archive(src, [layer([("file", "hello", b"hi")])], ["hello:1"])
    done = virtc(store, "image", "import", src)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello:1"
    done = virtc(store, "image", "import", src, "--name", "again")
    assert done.stdout.strip() == "again:latest"
    listed = json.loads(virtc(store, "image", "ls", "--json").stdout)
    assert [sorted(i["references"]) for i in listed] == [["again:latest", "hello:1"]]
    table = virtc(store, "image", "ls").stdout
    assert "hello:1" in table and listed[0]["id"] in table
    doc = json.loads(virtc(store, "image", "inspect", "hello:1").stdout)
    assert doc["digest"] == listed[0]["digest"]
    assert Path(doc["rootfs"], "hello").read_text() == "hi"
    assert virtc(store, "image", "rm", "hello:1").returncode == 0
    assert virtc(store, "image", "rm", "again").returncode == 0
    assert json.loads(virtc(store, "image", "ls", "--json").stdout) == []


def test_errors_name_the_problem(store: str, tmp_path: str) -> None:
    done = virtc(store, "image", "inspect", "nope")
    assert done.returncode == 1
    assert "unknown image reference 'nope'" in done.stderr
    bad = os.path.join(str(tmp_path), "bad.tar")
    oci_archive(bad, [layer([("file", "../x", b"x")])], "bad")
    done = virtc(store, "image", "import", bad)
    assert done.returncode == 1
    assert "entry '../x' has '..' in its path" in done.stderr


def test_rm_drops_a_stale_lease(store: str, tmp_path: str) -> None:
    """A lease whose sandbox is gone does not block rm (a live one does: test_images)."""
    src = os.path.join(str(tmp_path), "img.tar")
    docker_archive(src, [layer([("file", "a", b"a")])], ["used"])
    (image,) = ImageStore(store).import_archive(src)
    ImageStore(store).acquire("no-such-sandbox", image)
    done = virtc(store, "image", "rm", "used")
    assert done.returncode == 0, done.stderr
