"""The image store: import of the three archive formats, layer semantics, and hostile input
(each refused with a message naming the problem, nothing written outside the store, the store
left consistent)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from images_support import (
    config_doc,
    docker_archive,
    layer,
    oci_archive,
    oci_layout,
    sha256,
    store_problems,
)
from virtcontainers.errors import ImageError
from virtcontainers.images import ImageStore, default_image_root, normalize_reference

BASE = layer(
    [
        ("dir", "bin"),
        ("file", "bin/tool", b"#!/bin/sh\n", 0o755),
        ("dir", "etc"),
        ("file", "etc/gone", b"lower"),
        ("dir", "etc/opaque"),
        ("file", "etc/opaque/old", b"old"),
        ("file", "home/owned", b"mine", 0o640, 1000, 1001),
        ("sym", "etc/link", "../bin/tool"),
        ("link", "bin/hard", "bin/tool"),
        ("chr", "dev-null"),
        ("dir", "var/run-abs"),
    ]
)
TOP = layer(
    [
        ("file", "etc/.wh.gone", b""),
        ("file", "etc/opaque/.wh..wh..opq", b""),
        ("file", "etc/opaque/new", b"new"),
        ("file", "bin/tool", b"replaced", 0o700),
    ]
)


@pytest.fixture
def outside(tmp_path: str) -> Iterator[str]:
    """A directory beside the store: hostile layers aim at it; it must stay empty."""
    path = os.path.join(str(tmp_path), "outside")
    os.mkdir(path)
    yield path
    assert os.listdir(path) == [], "a layer wrote outside the store"


@pytest.fixture
def store(tmp_path: str) -> ImageStore:
    return ImageStore(os.path.join(str(tmp_path), "store"))


def _check_tree(root: str) -> None:
    assert Path(os.path.join(root, "bin/tool")).read_bytes() == b"replaced"
    assert os.stat(os.path.join(root, "bin/tool")).st_mode & 0o7777 == 0o700
    assert not os.path.lexists(os.path.join(root, "etc/gone"))
    assert sorted(os.listdir(os.path.join(root, "etc/opaque"))) == ["new"]
    assert os.readlink(os.path.join(root, "etc/link")) == "../bin/tool"
    # The hardlink was made in the lower layer; the upper layer replaced bin/tool with a
    # new file, so the link keeps the old content.
    assert Path(os.path.join(root, "bin/hard")).read_bytes() == b"#!/bin/sh\n"
    assert not os.path.lexists(os.path.join(root, "dev-null")), "device node not skipped"
    owned = os.stat(os.path.join(root, "home/owned"))
    assert owned.st_mode & 0o7777 == 0o640
    if os.geteuid() == 0:
        assert (owned.st_uid, owned.st_gid) == (1000, 1001)


@pytest.mark.parametrize("fmt", ["docker", "oci-archive", "oci-layout", "oci-gzip", "oci-zstd"])
def test_import_formats_and_layer_semantics(store: ImageStore, tmp_path: str, fmt: str) -> None:
    src = os.path.join(str(tmp_path), "image")
    layers = [BASE, TOP]
    config = config_doc(
        layers,
        Entrypoint=["/bin/tool"],
        Cmd=["--help"],
        Env=["PATH=/bin", "A=1"],
        WorkingDir="/home",
        User="1000:1001",
    )
    if fmt == "docker":
        docker_archive(src, layers, ["demo:1"], config)
    elif fmt == "oci-layout":
        oci_layout(src, layers, "demo:1", config=config)
    else:
        compression = {"oci-gzip": "gzip", "oci-zstd": "zstd"}.get(fmt, "")
        oci_archive(src, layers, "demo:1", compression=compression, config=config)
    (image,) = store.import_archive(src)
    assert image.references == ["demo:1"]
    assert image.config.argv() == ["/bin/tool", "--help"]
    assert image.config.argv(["x"]) == ["/bin/tool", "x"]
    assert image.config.env == ["PATH=/bin", "A=1"]
    assert (image.config.working_dir, image.config.user) == ("/home", "1000:1001")
    assert store.get("demo:1").digest == image.digest
    assert store.get(image.digest).digest == image.digest
    assert store.get(image.id).digest == image.digest
    _check_tree(store.rootfs(image))
    assert store_problems(store.root) == []


def test_name_retags_and_remove_collects_blobs(store: ImageStore, tmp_path: str) -> None:
    src = os.path.join(str(tmp_path), "a.tar")
    docker_archive(src, [BASE], ["one:latest"])
    (first,) = store.import_archive(src)
    (again,) = store.import_archive(src, name="two")
    assert again.digest == first.digest
    assert store.get("two").references == ["one:latest", "two:latest"]
    store.remove("one")
    assert store.get("two:latest").references == ["two:latest"]
    with pytest.raises(ImageError, match="unknown image reference 'one'"):
        store.get("one")
    store.remove("two")
    assert store.images() == []
    assert os.listdir(os.path.join(store.root, "blobs", "sha256")) == []
    assert os.listdir(os.path.join(store.root, "rootfs")) == []


def test_remove_refused_while_leased(store: ImageStore, tmp_path: str) -> None:
    src = os.path.join(str(tmp_path), "a.tar")
    docker_archive(src, [BASE], ["busy"])
    (image,) = store.import_archive(src)
    store.acquire("sb1", image)
    with pytest.raises(ImageError, match="in use by sandbox sb1"):
        store.remove("busy")
    assert store.get("busy")
    store.remove("busy", alive=lambda holder: False)  # a stale lease is dropped
    assert store.images() == []


def test_unknown_reference(store: ImageStore) -> None:
    with pytest.raises(ImageError, match="unknown image reference 'nope:1'"):
        store.get("nope:1")
    with pytest.raises(ImageError, match="unknown image reference 'nope'"):
        store.remove("nope")


def test_reference_normalization() -> None:
    assert normalize_reference("busybox") == "busybox:latest"
    assert normalize_reference("reg:5000/a/b") == "reg:5000/a/b:latest"
    assert normalize_reference("a/b:1.0") == "a/b:1.0"
    with pytest.raises(ImageError, match="invalid image reference"):
        normalize_reference("a b")


def test_default_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VC_IMAGE_ROOT", "/tmp/x-images")
    assert default_image_root() == "/tmp/x-images"
    monkeypatch.delenv("VC_IMAGE_ROOT")
    expected = "/var/lib/virtcontainers/images" if os.geteuid() == 0 else "virtcontainers/images"
    assert default_image_root().endswith(expected)


def _hostile(outside: str) -> dict[str, tuple[list[bytes], str]]:
    rel = os.path.relpath(outside, "/")
    return {
        "dotdot": (
            [layer([("file", "a/../../outside/x", b"x")])],
            r"entry 'a/../../outside/x' has '\.\.' in its path",
        ),
        "absolute": (
            [layer([("file", f"{outside}/x", b"x")])],
            f"entry '{outside}/x' has an absolute path",
        ),
        "symlink-escape": (
            [
                layer([("sym", "evil", "../../../../../../../../" + rel)]),
                layer([("file", "evil/pwned", b"x")]),
            ],
            r"entry 'evil/pwned': symlink 'evil' -> '(\.\./)+.*' on its path leads outside",
        ),
        "symlink-escape-same-layer": (
            [layer([("sym", "d", ".."), ("file", "d/d/pwned", b"x")])],
            "symlink 'd' -> '..' on its path leads outside the image root",
        ),
        "hardlink-absolute": (
            [layer([("link", "passwd", "/etc/passwd")])],
            r"hardlink to outside the image \('/etc/passwd'\)",
        ),
        "hardlink-dotdot": (
            [layer([("link", "passwd", "../../etc/passwd")])],
            r"hardlink to outside the image \('\.\./\.\./etc/passwd'\)",
        ),
        "hardlink-through-symlink": (
            [
                layer([("sym", "etc", "../../../../../etc")]),
                layer([("link", "passwd", "etc/passwd")]),
            ],
            "symlink 'etc' -> '(../)+etc' on its path leads outside the image root",
        ),
        "not-a-directory": (
            [layer([("file", "f", b"x"), ("file", "f/g", b"y")])],
            "'f' on its path is not a directory",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "dotdot",
        "absolute",
        "symlink-escape",
        "symlink-escape-same-layer",
        "hardlink-absolute",
        "hardlink-dotdot",
        "hardlink-through-symlink",
        "not-a-directory",
    ],
)
def test_hostile_layers_refused(store: ImageStore, tmp_path: str, outside: str, case: str) -> None:
    good = os.path.join(str(tmp_path), "good.tar")
    docker_archive(good, [BASE], ["good"])
    store.import_archive(good)
    layers, message = _hostile(outside)[case]
    src = os.path.join(str(tmp_path), "bad.tar")
    oci_archive(src, layers, "bad")
    with pytest.raises(ImageError, match=message):
        store.import_archive(src)
    with pytest.raises(ImageError, match="unknown image reference"):
        store.get("bad")
    assert [i.references for i in store.images()] == [["good:latest"]]
    assert store_problems(store.root) == []


def test_absolute_symlink_resolves_inside_the_root(
    store: ImageStore, tmp_path: str, outside: str
) -> None:
    """An absolute symlink means what it means inside the container: the root's own path."""
    src = os.path.join(str(tmp_path), "abs.tar")
    layers = [layer([("sym", "evil", outside)]), layer([("file", "evil/inside", b"x")])]
    oci_archive(src, layers, "abs")
    (image,) = store.import_archive(src)
    root = store.rootfs(image)
    assert Path(os.path.join(root, outside.lstrip("/"), "inside")).read_bytes() == b"x"


def _corrupt(path: str, how: str) -> None:
    data = bytearray(Path(path).read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data = bytearray(os.urandom(4096))
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_corrupt_archives_refused(store: ImageStore, tmp_path: str, how: str, fmt: str) -> None:
    src = os.path.join(str(tmp_path), "img.tar")
    big = layer([("file", "blob", os.urandom(200_000))])
    if fmt == "docker":
        docker_archive(src, [big], ["x"])
    else:
        oci_archive(src, [big], "x")
    _corrupt(src, how)
    with pytest.raises(ImageError, match=r"truncated or corrupt|not a readable image archive"):
        store.import_archive(src)
    assert store.images() == []
    assert store_problems(store.root) == []


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "zstd stream is truncated"),
        ("corrupt", "zstd stream is corrupt"),
        ("diff", "layer digest mismatch: the config says"),
    ],
)
def test_zstd_layer_refused(
    store: ImageStore, tmp_path: str, monkeypatch: pytest.MonkeyPatch, how: str, message: str
) -> None:
    """A zstd layer whose blob digest is right (the manifest names these very bytes) but
    whose stream stops inside a frame, is not zstd past its first frame, or does not
    decompress to the config's diff_id."""
    import images_support

    real = images_support.compress_layer

    def bad(data: bytes, compression: str) -> bytes:
        stored = real(data, compression)
        if how == "truncated":
            return stored[:-7]
        if how == "corrupt":
            return stored[: len(stored) // 2] + b"\x28\xb5\x2f\xfd" + os.urandom(64)
        return real(data[:-1024] + bytes(1024) + b"x", compression)

    monkeypatch.setattr(images_support, "compress_layer", bad)
    src = os.path.join(str(tmp_path), "layout")
    oci_layout(src, [BASE], "x", compression="zstd")
    with pytest.raises(ImageError, match=message):
        store.import_archive(src)
    assert store.images() == []
    assert store_problems(store.root) == []


def test_layout_blob_digest_mismatch(store: ImageStore, tmp_path: str) -> None:
    src = os.path.join(str(tmp_path), "layout")
    oci_layout(src, [BASE], "x")
    digest = sha256(BASE)
    with open(os.path.join(src, "blobs", "sha256", digest[7:]), "r+b") as f:
        f.seek(600)
        f.write(b"tampered")
    with pytest.raises(ImageError, match=f"digest mismatch: expected {digest}"):
        store.import_archive(src)
    assert store.images() == []
    assert store_problems(store.root) == []


def test_docker_layer_diff_id_mismatch(store: ImageStore, tmp_path: str) -> None:
    src = os.path.join(str(tmp_path), "img.tar")
    other = layer([("file", "x", b"other")])
    docker_archive(src, [BASE], ["x"], config=config_doc([other]))
    with pytest.raises(ImageError, match=f"layer digest mismatch: the config says {sha256(other)}"):
        store.import_archive(src)
    assert store_problems(store.root) == []


def test_missing_and_unknown_files(store: ImageStore, tmp_path: str) -> None:
    with pytest.raises(ImageError, match="no such file"):
        store.import_archive(os.path.join(str(tmp_path), "absent.tar"))
    empty = os.path.join(str(tmp_path), "empty")
    os.mkdir(empty)
    with pytest.raises(ImageError, match="not an image archive or layout"):
        store.import_archive(empty)
    layout = os.path.join(str(tmp_path), "layout")
    oci_layout(layout, [BASE], "x")
    shutil.rmtree(os.path.join(layout, "blobs"))
    with pytest.raises(ImageError, match=r"blobs/sha256/[0-9a-f]+ is missing"):
        store.import_archive(layout)
    assert store_problems(store.root) == []
