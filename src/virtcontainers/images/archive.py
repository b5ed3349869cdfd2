"""Read images out of `docker save` archives, OCI archives and OCI image layouts.

A source yields `Candidate`s: one per image, each with its manifest, config and layers as
blobs to copy. Nothing here writes; the store copies and checks every blob's digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import ImageError

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TYPES = {
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    MT_DOCKER_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar",
}
REF_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


def normalize_reference(ref: str) -> str:
    """`name` -> `name:latest`; `name:tag` and `name@sha256:...` unchanged; bad ones refused."""
    ref = ref.strip()
    if not ref or len(ref) > 255 or not _REFERENCE.match(ref):
        raise ImageError(f"invalid image reference {ref!r}")
    if "@" in ref or ":" in ref.rsplit("/", 1)[-1]:
        return ref
    return f"{ref}:latest"


def check_digest(digest: str, what: str) -> str:
    """The hex part of a `sha256:<hex>` digest; other algorithms and malformed ones refused."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ImageError(f"{what}: unsupported or malformed digest {digest!r}")
    return digest[len("sha256:") :]


@dataclass
class Blob:
    """A blob to copy out of the source: where it is, and what it must hash to (if known)."""

    name: str
    """Its name inside the source."""
    digest: str = ""
    """Expected `sha256:<hex>`, or "" when the source names none (it is computed)."""
    size: int = -1
    media_type: str = ""
    diff_id: str = ""
    """For layers: the expected digest of the uncompressed tar (the config's rootfs.diff_ids)."""


@dataclass
class Candidate:
    """One image found in a source."""

    names: list[str]
    config: Blob
    layers: list[Blob]
    manifest: bytes = b""
    """The OCI manifest as found (empty: the store writes one from the blobs)."""
    manifest_digest: str = ""
    annotations: dict[str, str] = field(default_factory=dict)


class Source:
    """An archive (tar, optionally gzip) or a directory, read by member name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if not os.path.exists(path):
            raise ImageError(f"{path}: no such file or directory")
        if os.path.isdir(path):
            return
        try:
            self._tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 (closed by close())
            for m in self._tar.getmembers():
                name = _norm(m.name)
                if name:
                    self._members[name] = m
        except (tarfile.TarError, EOFError, zlib.error) as e:
            self.close()
            raise ImageError(
                f"{path} is not a readable image archive (truncated or corrupt): {e}"
            ) from None
        except OSError as e:
            self.close()
            raise ImageError(f"{path}: cannot read: {e.strerror or e}") from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        if self._tar is None:
            return os.path.isfile(os.path.join(self.path, name))
        member = self._members.get(_norm(name))
        return member is not None and (member.isreg() or member.islnk())

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """Open a member (following an archive's hardlinks) or a file under the directory."""
        if self._tar is None:
            full = os.path.join(self.path, name)
            if os.path.islink(full) or not os.path.isfile(full):
                raise ImageError(f"{self.path}: {name} is missing")
            with open(full, "rb") as f:
                yield f
            return
        member = self._members.get(_norm(name))
        if member is None:
            raise ImageError(f"{self.path}: {name} is missing from the archive")
        try:
            member_file = self._tar.extractfile(member)
        except (tarfile.TarError, KeyError) as e:
            raise ImageError(f"{self.path}: {name} cannot be read: {e}") from None
        if member_file is None:
            raise ImageError(f"{self.path}: {name} is not a file")
        with member_file:
            yield member_file

    def read_json(self, name: str, limit: int = 16 << 20) -> tuple[bytes, Any]:
        """A member's bytes and its JSON (documents, not layers: size-capped)."""
        try:
            with self.open(name) as f:
                data = f.read(limit + 1)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ImageError(f"{self.path}: {name} is truncated or corrupt: {e}") from None
        if len(data) > limit:
            raise ImageError(f"{self.path}: {name} is larger than {limit} bytes")
        try:
            return data, json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"{self.path}: {name} is not valid JSON: {e}") from None


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def read_candidates(src: Source) -> list[Candidate]:
    """Every image in the source, by its format (OCI index first, else docker's manifest)."""
    if src.has("index.json") and src.has("oci-layout"):
        return _oci_candidates(src)
    if src.has("manifest.json"):
        return _docker_candidates(src)
    raise ImageError(
        f"{src.path}: not an image archive or layout (no index.json + oci-layout, "
        "no docker manifest.json)"
    )


def _blob_name(digest: str, what: str) -> str:
    return f"blobs/sha256/{check_digest(digest, what)}"


def _descriptor(d: Any, what: str) -> Blob:
    if not isinstance(d, dict) or "digest" not in d:
        raise ImageError(f"{what}: malformed descriptor {d!r}")
    size = d.get("size", -1)
    if not isinstance(size, int):
        raise ImageError(f"{what}: malformed size {size!r}")
    return Blob(
        name=_blob_name(d["digest"], what),
        digest=d["digest"],
        size=size,
        media_type=str(d.get("mediaType", "")),
    )


def _read_blob_json(src: Source, blob: Blob, what: str) -> tuple[bytes, Any]:
    data, doc = src.read_json(blob.name)
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != blob.digest:
        raise ImageError(f"{what}: digest mismatch for {blob.digest} (content hashes to {got})")
    if blob.size >= 0 and blob.size != len(data):
        raise ImageError(f"{what}: {blob.digest} has {len(data)} bytes, {blob.size} expected")
    return data, doc


def _oci_candidates(src: Source) -> list[Candidate]:
    _, layout = src.read_json("oci-layout")
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise ImageError(f"{src.path}: oci-layout has no imageLayoutVersion")
    _, index = src.read_json("index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{src.path}: index.json lists no manifests")
    found: list[Candidate] = []
    for d in manifests:
        found.extend(_from_descriptor(src, d, 0))
    return found


def _from_descriptor(src: Source, d: Any, depth: int) -> list[Candidate]:
    what = f"{src.path}: manifest {d.get('digest') if isinstance(d, dict) else d!r}"
    desc = _descriptor(d, what)
    annotations = d.get("annotations") or {}
    if not isinstance(annotations, dict):
        annotations = {}
    data, doc = _read_blob_json(src, desc, what)
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: not a JSON object")
    media = desc.media_type or str(doc.get("mediaType", ""))
    if media in (MT_OCI_INDEX, MT_DOCKER_LIST) or "manifests" in doc:
        if depth > 2:
            raise ImageError(f"{what}: indexes nested too deeply")
        picked = _pick_platform(doc.get("manifests"), what)
        found = _from_descriptor(src, picked, depth + 1)
        for c in found:
            c.names = c.names or _names(annotations)
        return found
    if media not in (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST, ""):
        raise ImageError(f"{what}: unsupported manifest media type {media!r}")
    config = _descriptor(doc.get("config"), f"{what}: config")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, list):
        raise ImageError(f"{what}: manifest has no layers list")
    layers = [_descriptor(x, f"{what}: layer") for x in layers_doc]
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise ImageError(
                f"{what}: layer {layer.digest} has unsupported type {layer.media_type!r}"
            )
    return [
        Candidate(
            names=_names(annotations),
            config=config,
            layers=layers,
            manifest=data,
            manifest_digest=desc.digest,
            annotations={str(k): str(v) for k, v in annotations.items()},
        )
    ]


def _pick_platform(manifests: Any, what: str) -> Any:
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{what}: index lists no manifests")
    for d in manifests:
        platform = d.get("platform") if isinstance(d, dict) else None
        if not platform or (platform.get("os"), platform.get("architecture")) == (
            "linux",
            "amd64",
        ):
            return d
    raise ImageError(f"{what}: no linux/amd64 image in the index")


def _names(annotations: Any) -> list[str]:
    for key in REF_ANNOTATIONS:
        value = annotations.get(key) if isinstance(annotations, dict) else None
        if isinstance(value, str) and value:
            return [value]
    return []


def _docker_candidates(src: Source) -> list[Candidate]:
    _, manifest = src.read_json("manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError(f"{src.path}: manifest.json lists no images")
    found: list[Candidate] = []
    for i, entry in enumerate(manifest):
        what = f"{src.path}: image {i} of manifest.json"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise ImageError(f"{what}: no Config")
        layer_names = entry.get("Layers")
        if not isinstance(layer_names, list) or not all(isinstance(x, str) for x in layer_names):
            raise ImageError(f"{what}: no Layers list")
        config_name = entry["Config"]
        data, config_doc = src.read_json(config_name)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        named = re.search(r"([0-9a-f]{64})(\.json)?$", config_name)
        if named and named.group(1) != digest[7:]:
            raise ImageError(
                f"{what}: digest mismatch for config {config_name} (content hashes to {digest})"
            )
        diff_ids = (config_doc.get("rootfs") or {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_names):
            raise ImageError(
                f"{what}: config lists {len(diff_ids) if isinstance(diff_ids, list) else 0} "
                f"layer digests for {len(layer_names)} layers"
            )
        layers = []
        for name, diff_id in zip(layer_names, diff_ids, strict=True):
            check_digest(diff_id, f"{what}: layer {name}")
            layers.append(Blob(name=name, diff_id=diff_id))
        tags = entry.get("RepoTags") or []
        found.append(
            Candidate(
                names=[t for t in tags if isinstance(t, str)],
                config=Blob(
                    name=config_name, digest=digest, size=len(data), media_type=MT_OCI_CONFIG
                ),
                layers=layers,
            )
        )
    return found


def is_gzip(head: bytes) -> bool:
    return head[:2] == _GZIP_MAGIC


def is_zstd(head: bytes) -> bool:
    """A zstd frame, or a skippable frame (zstd:chunked starts some layers with one)."""
    return head[:4] == _ZSTD_MAGIC or (
        len(head) >= 4 and int.from_bytes(head[:4], "little") in _ZSTD_SKIPPABLE
    )


class LayerDecoder:
    """A compressed layer's stream -> its tar, chunk by chunk: gzip (one member) or zstd
    (any number of frames, skippable ones included). `finish` refuses a stream that stops
    inside a gzip member or a zstd frame."""

    def __init__(self, kind: str, what: str) -> None:
        import zstandard  # only when a layer is zstd: the CLI's start-up stays lean

        self.kind = kind
        self.what = what
        self._zstd_error = zstandard.ZstdError
        self._zstd = zstandard.ZstdDecompressor() if kind == "zstd" else None
        self._d: Any = self._new()
        self._fed = False

    @classmethod
    def for_head(cls, head: bytes, what: str) -> LayerDecoder | None:
        """The decoder for a stream starting with `head` (`what` names it in errors), None
        for a plain tar."""
        if is_gzip(head):
            return cls("gzip", what)
        if is_zstd(head):
            return cls("zstd", what)
        return None

    def _new(self) -> Any:
        if self._zstd is not None:
            return self._zstd.decompressobj()
        return zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, chunk: bytes) -> bytes:
        try:
            if self.kind == "gzip":
                if self._d.eof and chunk:
                    raise ImageError(f"{self.what}: data after the end of the gzip stream")
                return bytes(self._d.decompress(chunk))
            out = []
            while chunk:
                self._fed = True
                out.append(self._d.decompress(chunk))
                if not self._d.eof:
                    break
                chunk = self._d.unused_data
                self._d = self._new()
                self._fed = False
            return b"".join(out)
        except self._zstd_error as e:
            raise ImageError(f"{self.what}: zstd stream is corrupt: {e}") from None

    def finish(self) -> bytes:
        if self.kind == "gzip":
            tail = bytes(self._d.flush())
            if not self._d.eof:
                raise ImageError(f"{self.what}: gzip stream is truncated")
            return tail
        if self._fed:
            raise ImageError(f"{self.what}: zstd stream is truncated")
        return b""
