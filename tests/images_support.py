"""Image archives for tests, written with tarfile (there is no registry here).

`layer([...])` makes a layer tar from entry tuples; `docker_archive`, `oci_layout` and
`oci_archive` wrap layers into the three formats the store imports.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import zstandard

Entry = tuple[Any, ...]


def layer(entries: list[Entry]) -> bytes:
    """A layer tar. Entries: ("file", name, data[, mode, uid, gid]), ("dir", name[, mode]),
    ("sym", name, target), ("link", name, target), ("chr", name), ("fifo", name)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, *rest in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            data = None
            if kind == "file":
                data = rest[0]
                info.size = len(data)
                info.mode = rest[1] if len(rest) > 1 else 0o644
                if len(rest) > 2:
                    info.uid, info.gid = rest[2], rest[3]
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = rest[0] if rest else 0o755
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, rest[0]
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, rest[0]
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_doc(layers: list[bytes], **config: Any) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": config or {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(x) for x in layers]},
    }


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def docker_archive(
    path: str, layers: list[bytes], tags: list[str], config: dict[str, Any] | None = None
) -> None:
    """A `docker save` archive (legacy layout: <id>/layer.tar, <config hex>.json)."""
    doc = config or config_doc(layers)
    config_bytes = json.dumps(doc).encode()
    config_name = sha256(config_bytes)[7:] + ".json"
    with tarfile.open(path, "w") as tf:
        names = []
        for i, data in enumerate(layers):
            name = f"{i:064x}/layer.tar"
            _add(tf, name, data)
            names.append(name)
        _add(tf, config_name, config_bytes)
        manifest = [{"Config": config_name, "RepoTags": tags, "Layers": names}]
        _add(tf, "manifest.json", json.dumps(manifest).encode())


def compress_layer(data: bytes, compression: str) -> bytes:
    """A layer tar as stored: as is, gzip or zstd (several frames, as chunked writers make)."""
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        half = len(data) // 2
        zc = zstandard.ZstdCompressor()
        return zc.compress(data[:half]) + zc.compress(data[half:])
    assert not compression, compression
    return data


def _oci_files(
    layers: list[bytes], ref: str, compression: str, config: dict[str, Any] | None
) -> dict[str, bytes]:
    blobs: dict[str, bytes] = {}
    descs = []
    for data in layers:
        stored = compress_layer(data, compression)
        media = "application/vnd.oci.image.layer.v1.tar" + (
            f"+{compression}" if compression else ""
        )
        blobs[sha256(stored)] = stored
        descs.append({"mediaType": media, "digest": sha256(stored), "size": len(stored)})
    config_bytes = json.dumps(config or config_doc(layers)).encode()
    blobs[sha256(config_bytes)] = config_bytes
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config_bytes),
                "size": len(config_bytes),
            },
            "layers": descs,
        }
    ).encode()
    blobs[sha256(manifest)] = manifest
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    files = {f"blobs/sha256/{d[7:]}": b for d, b in blobs.items()}
    files["index.json"] = json.dumps(index).encode()
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    return files


def oci_layout(
    path: str,
    layers: list[bytes],
    ref: str,
    compression: str = "",
    config: dict[str, Any] | None = None,
) -> None:
    """An OCI image layout directory (`compression`: "", "gzip" or "zstd" layers)."""
    for name, data in _oci_files(layers, ref, compression, config).items():
        full = os.path.join(path, name)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)


def oci_archive(
    path: str,
    layers: list[bytes],
    ref: str,
    compression: str = "",
    config: dict[str, Any] | None = None,
) -> None:
    """An OCI archive (a tar of an OCI image layout; `compression` as `oci_layout`)."""
    with tarfile.open(path, "w") as tf:
        for name, data in _oci_files(layers, ref, compression, config).items():
            _add(tf, name, data)


def store_problems(root: str) -> list[str]:
    """What is inconsistent in a store: images whose blobs or rootfs are missing, leftover
    staging, blobs no image uses."""
    problems = []
    records_path = os.path.join(root, "images.json")
    records = {}
    if os.path.exists(records_path):
        records = json.loads(Path(records_path).read_text())["images"]
    used = set()
    for digest in records:
        manifest_path = os.path.join(root, "blobs", "sha256", digest[7:])
        if not os.path.exists(manifest_path):
            problems.append(f"manifest {digest} missing")
            continue
        manifest = json.loads(Path(manifest_path).read_text())
        blobs = [digest, manifest["config"]["digest"]] + [x["digest"] for x in manifest["layers"]]
        used |= set(blobs)
        for blob in blobs:
            if not os.path.exists(os.path.join(root, "blobs", "sha256", blob[7:])):
                problems.append(f"blob {blob} of {digest} missing")
        if not os.path.isdir(os.path.join(root, "rootfs", digest[7:])):
            problems.append(f"rootfs of {digest} missing")
    blob_dir = os.path.join(root, "blobs", "sha256")
    for name in os.listdir(blob_dir) if os.path.isdir(blob_dir) else []:
        if "sha256:" + name not in used:
            problems.append(f"blob {name} unused")
    rootfs_dir = os.path.join(root, "rootfs")
    for name in os.listdir(rootfs_dir) if os.path.isdir(rootfs_dir) else []:
        if "sha256:" + name not in records:
            problems.append(f"rootfs {name} unused")
    tmp = os.path.join(root, "tmp")
    if os.path.isdir(tmp) and os.listdir(tmp):
        problems.append(f"staging left: {os.listdir(tmp)}")
    return problems
