"""Write OCI image archives without a registry or a container engine: the suite's test images
(busybox from Debian's busybox-static; Debian bookworm with python3 and iperf3 by
`mmdebstrap`), cached under a directory by the hash of their inputs.

`python -m virtcontainers.images.build busybox|debian [--cache DIR]` prints the archive path
(scripts/demo.sh and the tests use it); `virtc image import` takes it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from typing import Any

from ..errors import ImageError
from ..host import host_dir
from .archive import MT_OCI_CONFIG, MT_OCI_INDEX, MT_OCI_LAYER, MT_OCI_MANIFEST

BUILDER_VERSION = "1"
BUSYBOX = "/bin/busybox"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ("python3", "ca-certificates", "iperf3")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def default_cache_dir() -> str:
    """`$VC_TEST_IMAGES`, else /var/cache/virtcontainers/test-images as root, else ~/.cache."""
    return host_dir(
        "VC_TEST_IMAGES",
        "/var/cache/virtcontainers/test-images",
        "XDG_CACHE_HOME",
        ".cache",
        "virtcontainers",
        "test-images",
    )


def image_config(
    layer_digests: Iterable[str],
    *,
    cmd: list[str],
    entrypoint: list[str] | None = None,
    env: list[str] | None = None,
    working_dir: str = "",
    user: str = "",
) -> dict[str, Any]:
    """An OCI image config document for uncompressed layers with these digests."""
    config: dict[str, Any] = {"Cmd": cmd, "Env": env or [f"PATH={DEFAULT_PATH}"]}
    if entrypoint:
        config["Entrypoint"] = entrypoint
    if working_dir:
        config["WorkingDir"] = working_dir
    if user:
        config["User"] = user
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(layer_digests)},
    }


def _sha256_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest(), os.path.getsize(path)


def write_oci_archive(
    path: str, layers: list[str], config: dict[str, Any] | None, ref: str, **config_kw: Any
) -> None:
    """Write an OCI archive (a tar of an OCI image layout) with uncompressed layer tars
    `layers`; the config is `config`, else one made by `image_config(**config_kw)`."""
    layer_descs: list[dict[str, Any]] = []
    for layer in layers:
        digest, size = _sha256_file(layer)
        layer_descs.append({"mediaType": MT_OCI_LAYER, "digest": digest, "size": size})
    if config is None:
        config = image_config([d["digest"] for d in layer_descs], **config_kw)
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_desc = _desc(MT_OCI_CONFIG, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": config_desc,
        "layers": layer_descs,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_INDEX,
        "manifests": [
            _desc(MT_OCI_MANIFEST, manifest_bytes)
            | {"annotations": {"org.opencontainers.image.ref.name": ref}}
        ],
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        _add_bytes(tf, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(tf, "index.json", json.dumps(index).encode())
        for data in (manifest_bytes, config_bytes):
            _add_bytes(tf, f"blobs/sha256/{hashlib.sha256(data).hexdigest()}", data)
        for layer, desc in zip(layers, layer_descs, strict=True):
            tf.add(layer, arcname=f"blobs/sha256/{desc['digest'][7:]}", recursive=False)
    os.replace(tmp, path)


def _desc(media_type: str, data: bytes) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def _cached(kind: str, inputs: dict[str, Any], cache_dir: str | None) -> tuple[str, bool]:
    """The archive path for these inputs, and whether it exists already."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir or default_cache_dir()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{kind}-{key}.oci.tar")
    return path, os.path.isfile(path)


def _busybox_layer(out: str) -> None:
    applets = subprocess.run(
        [BUSYBOX, "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for d, mode in (
            ("bin", 0o755),
            ("sbin", 0o755),
            ("usr", 0o755),
            ("usr/bin", 0o755),
            ("usr/sbin", 0o755),
            ("etc", 0o755),
            ("tmp", 0o1777),
            ("root", 0o700),
            ("proc", 0o555),
            ("sys", 0o555),
            ("dev", 0o755),
            ("home", 0o755),
        ):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tf.addfile(info)
        tf.add(BUSYBOX, arcname="bin/busybox", recursive=False)
        for applet in applets:
            if applet == "bin/busybox":
                continue
            info = tarfile.TarInfo(applet)
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "/bin/busybox", 0o777
            tf.addfile(info)
        _add_bytes(
            tf,
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        )
        _add_bytes(tf, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        _add_bytes(tf, "etc/hostname", b"busybox\n")


def busybox_image(cache_dir: str | None = None) -> str:
    """An OCI archive `busybox:latest` of Debian's busybox-static (cached by its digest)."""
    if not os.path.isfile(BUSYBOX):
        raise ImageError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    inputs = {"builder": BUILDER_VERSION, "busybox": _sha256_file(BUSYBOX)[0]}
    path, present = _cached("busybox", inputs, cache_dir)
    if present:
        return path
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        layer = os.path.join(tmp, "layer.tar")
        _busybox_layer(layer)
        write_oci_archive(path, [layer], None, "busybox:latest", cmd=["sh"])
    return path


def debian_image(cache_dir: str | None = None) -> str:
    """An OCI archive `debian-python:bookworm` (minbase + python3, and iperf3 for the network
    benchmark) built by mmdebstrap from Debian's archive; slow the first time, then cached by
    its inputs."""
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise ImageError("mmdebstrap is missing: apt-get install mmdebstrap")
    inputs = {
        "builder": BUILDER_VERSION,
        "suite": DEBIAN_SUITE,
        "mirror": DEBIAN_MIRROR,
        "packages": list(DEBIAN_PACKAGES),
    }
    path, present = _cached("debian", inputs, cache_dir)
    if present:
        return path
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        layer = os.path.join(tmp, "layer.tar")
        argv = [
            mmdebstrap,
            "--quiet",
            "--variant=minbase",
            f"--include={','.join(DEBIAN_PACKAGES)}",
            "--format=tar",
            # No caches, docs or apt lists in the image.
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--customize-hook=rm -rf $1/var/cache/apt/* $1/var/lib/apt/lists/*",
            DEBIAN_SUITE,
            layer,
            DEBIAN_MIRROR,
        ]
        done = subprocess.run(argv, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise ImageError(f"mmdebstrap failed ({done.returncode}): {done.stderr[-2000:]}")
        write_oci_archive(path, [layer], None, "debian-python:bookworm", cmd=["python3"])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("image", choices=["busybox", "debian"])
    parser.add_argument("--cache", default=None, help="cache directory")
    args = parser.parse_args(argv)
    build = busybox_image if args.image == "busybox" else debian_image
    print(build(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
