"""The local content-addressed OCI image store.

Layout under the root (`$VC_IMAGE_ROOT`; else /var/lib/virtcontainers/images as root, else
`$XDG_DATA_HOME/virtcontainers/images`):

    blobs/sha256/<hex>   manifests, configs and layers, each named by its digest
    images.json          manifest digest -> references (name:tag) and import time
    rootfs/<hex>         an image's layers unpacked (made on first use, by manifest digest)
    rootfs/<hex>.shift-N its owners shifted by N for user namespaces (metadata-only copies)
    leases/<holder>      who uses which image (a sandbox): such an image is not removed
    tmp/                 staging: an import or unpack is built here and renamed into place
    lock                 every change holds this flock

An import copies each blob into staging while checking its digest (and a layer's uncompressed
digest against the config's diff_ids), and only when the whole archive checked out moves the
blobs in and records the references: a failed import leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ImageError, StateError
from ..host import host_dir
from ..persist import atomic_write, ensure_dir, validate_id
from . import archive
from .archive import Blob, Candidate, Source, check_digest, normalize_reference

ROOT_ENV = "VC_IMAGE_ROOT"
IMAGES_FILE = "images.json"
_CHUNK = 1 << 20


def default_image_root() -> str:
    """`$VC_IMAGE_ROOT`, else /var/lib/virtcontainers/images as root, else the data dir."""
    return host_dir(
        ROOT_ENV,
        "/var/lib/virtcontainers/images",
        "XDG_DATA_HOME",
        ".local/share",
        "virtcontainers",
        "images",
    )


@dataclass(frozen=True)
class ImageConfig:
    """What the image config says about running it (OCI image spec `config`)."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    architecture: str = ""
    os: str = ""

    @classmethod
    def from_doc(cls, doc: Any, what: str) -> ImageConfig:
        if not isinstance(doc, dict):
            raise ImageError(f"{what}: image config is not a JSON object")
        c = doc.get("config") or {}
        if not isinstance(c, dict):
            raise ImageError(f"{what}: image config's 'config' is not an object")

        def strings(key: str) -> list[str]:
            value = c.get(key) or []
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise ImageError(f"{what}: image config {key} is not a list of strings")
            return list(value)

        def text(value: Any, key: str) -> str:
            if value is None:
                return ""
            if not isinstance(value, str):
                raise ImageError(f"{what}: image config {key} is not a string")
            return value

        return cls(
            entrypoint=strings("Entrypoint"),
            cmd=strings("Cmd"),
            env=strings("Env"),
            working_dir=text(c.get("WorkingDir"), "WorkingDir"),
            user=text(c.get("User"), "User"),
            architecture=text(doc.get("architecture"), "architecture"),
            os=text(doc.get("os"), "os"),
        )

    def argv(self, cmd: list[str] | None = None) -> list[str]:
        """What a container runs: Entrypoint + (the given command, else Cmd)."""
        return [*self.entrypoint, *(cmd if cmd else self.cmd)]


@dataclass(frozen=True)
class Image:
    """An image in the store, named by its manifest digest."""

    digest: str
    references: list[str]
    config: ImageConfig
    config_digest: str
    layers: list[str]
    size: int
    """Bytes of its blobs (manifest, config, layers as stored)."""
    imported: float

    @property
    def id(self) -> str:
        return self.digest[len("sha256:") : len("sha256:") + 12]

    @property
    def name(self) -> str:
        """Its first reference, else its digest."""
        return self.references[0] if self.references else self.digest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"id": self.id}


class ImageStore:
    """Import, list, inspect, remove and unpack images; see the module doc for the layout."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_image_root())

    # -- paths and records ----------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", check_digest(digest, "blob"))

    def rootfs_path(self, image: Image) -> str:
        return os.path.join(self.root, "rootfs", check_digest(image.digest, "image"))

    def _records(self) -> dict[str, dict[str, Any]]:
        path = os.path.join(self.root, IMAGES_FILE)
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ImageError(f"the image store's {path} is unreadable: {e}") from None
        images = doc.get("images") if isinstance(doc, dict) else None
        return images if isinstance(images, dict) else {}

    def _write_records(self, records: dict[str, dict[str, Any]]) -> None:
        data = json.dumps({"version": 1, "images": records}, indent=1, sort_keys=True).encode()
        atomic_write(os.path.join(self.root, IMAGES_FILE), data, 0o644)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's lock; staging left by a killed writer is removed on entry."""
        try:
            ensure_dir(self.root, 0o755)
            for sub in ("blobs/sha256", "rootfs", "leases", "tmp"):
                ensure_dir(os.path.join(self.root, sub), 0o755)
            fd = os.open(
                os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        except (OSError, StateError) as e:
            raise ImageError(f"cannot open the image store {self.root}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            tmp = os.path.join(self.root, "tmp")
            for name in os.listdir(tmp):
                _remove_tree(os.path.join(tmp, name))
            yield
        finally:
            os.close(fd)

    def _load(self, digest: str, record: dict[str, Any]) -> Image:
        what = f"image {digest}"
        try:
            with open(self.blob_path(digest), "rb") as f:
                manifest = json.load(f)
            config_desc = manifest["config"]
            with open(self.blob_path(config_desc["digest"]), "rb") as f:
                config = ImageConfig.from_doc(json.load(f), what)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ImageError(f"{what} is damaged in the store {self.root}: {e}") from None
        layers = [str(x["digest"]) for x in manifest.get("layers", [])]
        size = os.path.getsize(self.blob_path(digest)) + int(config_desc.get("size", 0))
        size += sum(int(x.get("size", 0)) for x in manifest.get("layers", []))
        return Image(
            digest=digest,
            references=sorted(record.get("references", [])),
            config=config,
            config_digest=str(config_desc["digest"]),
            layers=layers,
            size=size,
            imported=float(record.get("imported", 0.0)),
        )

    # -- queries ----------------------------------------------------------------------------

    def images(self) -> list[Image]:
        """Every image in the store, newest import first."""
        found = [self._load(d, r) for d, r in self._records().items()]
        return sorted(found, key=lambda i: (-i.imported, i.name))

    def get(self, ref: str) -> Image:
        """The image a reference (name[:tag], a digest, or a unique id prefix) names."""
        records = self._records()
        digest = _resolve(records, ref)
        if digest is None:
            raise ImageError(f"unknown image reference {ref!r} (see `virtc image ls`)")
        return self._load(digest, records[digest])

    def holders(self, image: Image) -> list[str]:
        """The holders (sandbox ids) whose lease names this image."""
        leases = os.path.join(self.root, "leases")
        found = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(leases)):
                with contextlib.suppress(OSError), open(os.path.join(leases, name)) as f:
                    if f.read().strip() == image.digest:
                        found.append(name)
        return found

    # -- changes ----------------------------------------------------------------------------

    def acquire(self, holder: str, image: Image) -> None:
        """Record that `holder` (a sandbox id) uses the image: `remove` refuses it until
        `release`."""
        with self._locked():
            path = os.path.join(self.root, "leases", validate_id(holder, "lease holder"))
            atomic_write(path, image.digest.encode(), 0o644, durable=False)

    def release(self, holder: str) -> None:
        """Drop `holder`'s lease (no error if it holds none)."""
        path = os.path.join(self.root, "leases", validate_id(holder, "lease holder"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def import_archive(self, path: str, name: str | None = None) -> list[Image]:
        """Import every image of a docker-archive, OCI archive or OCI layout; `name` tags the
        single image it holds. Returns the imported images."""
        if name is not None:
            name = normalize_reference(name)
        with Source(path) as src:
            candidates = archive.read_candidates(src)
            if name is not None and len(candidates) != 1:
                raise ImageError(f"{path} holds {len(candidates)} images: --name needs exactly one")
            with self._locked():
                staging = tempfile.mkdtemp(prefix="import-", dir=os.path.join(self.root, "tmp"))
                try:
                    for c in candidates:
                        self._stage(src, c, staging)
                    digests = self._commit(staging, candidates, name)
                finally:
                    _remove_tree(staging)
        records = self._records()
        return [self._load(d, records[d]) for d in digests]

    def _stage(self, src: Source, c: Candidate, staging: str) -> None:
        """Copy one image's blobs into staging, checking each, and unpack its layers there
        (a hostile layer fails the import, before the store changes)."""
        config = _copy_blob(src, c.config, staging)
        with open(os.path.join(staging, check_digest(config.digest, "config")), "rb") as f:
            try:
                config_doc = json.load(f)
            except ValueError as e:
                raise ImageError(
                    f"{src.path}: image config {config.digest} is not JSON: {e}"
                ) from None
        ImageConfig.from_doc(config_doc, f"{src.path}: config {config.digest}")
        diff_ids = (config_doc.get("rootfs") or {}).get("diff_ids") or []
        if not isinstance(diff_ids, list) or len(diff_ids) != len(c.layers):
            raise ImageError(
                f"{src.path}: image config {config.digest} lists {len(diff_ids)} layer digests "
                f"for {len(c.layers)} layers"
            )
        layers = []
        for blob, diff_id in zip(c.layers, diff_ids, strict=True):
            blob.diff_id = blob.diff_id or str(diff_id)
            layers.append(_copy_blob(src, blob, staging))
        if c.manifest:
            manifest = c.manifest
        else:
            doc = {
                "schemaVersion": 2,
                "mediaType": archive.MT_OCI_MANIFEST,
                "config": _desc(config),
                "layers": [_desc(x) for x in layers],
            }
            manifest = json.dumps(doc, separators=(",", ":")).encode()
        hexd = hashlib.sha256(manifest).hexdigest()
        with open(os.path.join(staging, hexd), "wb") as f:
            f.write(manifest)
        c.manifest_digest = "sha256:" + hexd
        tree = os.path.join(staging, f"rootfs-{hexd}")
        if not os.path.isdir(os.path.join(self.root, "rootfs", hexd)) and not os.path.isdir(tree):
            from .unpack import apply_layer  # not for a run from an unpacked image

            os.mkdir(tree, 0o755)
            name = c.names[0] if c.names else c.manifest_digest
            for i, layer in enumerate(layers):
                with open(os.path.join(staging, layer.digest[len("sha256:") :]), "rb") as f:
                    apply_layer(tree, f, f"image {name}: layer {i} ({layer.digest})")

    def _commit(
        self,
        staging: str,
        candidates: list[Candidate],
        name: str | None,
    ) -> list[str]:
        for entry in os.listdir(staging):
            if entry.startswith("rootfs-"):
                final = os.path.join(self.root, "rootfs", entry[len("rootfs-") :])
            else:
                final = os.path.join(self.root, "blobs", "sha256", entry)
                os.chmod(os.path.join(staging, entry), 0o644)
            if not os.path.exists(final):
                os.rename(os.path.join(staging, entry), final)
        records = self._records()
        now = time.time()
        digests = []
        for c in candidates:
            refs = [name] if name is not None else [normalize_reference(n) for n in c.names]
            digest = c.manifest_digest
            for record in records.values():
                record["references"] = [r for r in record.get("references", []) if r not in refs]
            old = records.get(digest, {})
            merged = sorted(set(old.get("references", [])) | set(refs))
            records[digest] = {"references": merged, "imported": now}
            digests.append(digest)
        self._write_records(records)
        return digests

    def remove(self, ref: str, alive: Callable[[str], bool] | None = None) -> Image:
        """Remove a reference; the image goes (with the blobs no other image uses) when it
        was its last one, or when `ref` is its digest. Refused while a holder uses it
        (`alive(holder)` False: the lease is stale and dropped)."""
        with self._locked():
            records = self._records()
            digest = _resolve(records, ref)
            if digest is None:
                raise ImageError(f"unknown image reference {ref!r} (see `virtc image ls`)")
            image = self._load(digest, records[digest])
            holders = self.holders(image)
            if alive is not None:
                for h in [h for h in holders if not alive(h)]:
                    self.release(h)
                    holders.remove(h)
            norm = _normalized(ref)
            if norm in image.references and len(image.references) > 1:
                records[digest]["references"].remove(norm)
                self._write_records(records)
                return image
            if holders:
                raise ImageError(f"image {ref!r} is in use by sandbox {', '.join(holders)}")
            del records[digest]
            self._write_records(records)
            keep = set()
            for other in records:
                keep |= {other, *self._blob_digests(other)}
            for blob in {digest, *self._blob_digests(digest)} - keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.blob_path(blob))
            root = self.rootfs_path(image)
            parent, prefix = os.path.dirname(root), os.path.basename(root) + SHIFTED
            for entry in os.listdir(parent):
                if entry.startswith(prefix):
                    _remove_tree(os.path.join(parent, entry))
            _remove_tree(root)
            return image

    def _blob_digests(self, manifest_digest: str) -> set[str]:
        try:
            with open(self.blob_path(manifest_digest), "rb") as f:
                doc = json.load(f)
            return {doc["config"]["digest"], *(x["digest"] for x in doc.get("layers", []))}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def rootfs(self, image: Image) -> str:
        """The image's layers unpacked into a directory (made once, then reused). Callers
        must not change it: containers get their own writable layer over it."""

        def unpack(staging: str) -> str:
            from .unpack import apply_layer  # not for a run from an unpacked image

            tree = os.path.join(staging, "rootfs")
            os.mkdir(tree, 0o755)
            for i, layer in enumerate(image.layers):
                with open(self.blob_path(layer), "rb") as f:
                    apply_layer(tree, f, f"image {image.name}: layer {i} ({layer})")
            return tree

        return self._made_once(self.rootfs_path(image), unpack)

    def shifted_rootfs(self, image: Image, offset: int) -> str:
        """A layer of the image's root with every owner shifted by `offset` (overlay
        metadata-only copies, their data in `rootfs`), for containers whose user namespace
        maps id 0 to `offset`: stacked over `rootfs`, made once per image and offset."""
        from ..containers.idshift import build_shifted_layer

        lower = self.rootfs(image)
        return self._made_once(
            f"{lower}{SHIFTED}{int(offset)}",
            lambda staging: build_shifted_layer(lower, offset, staging),
        )

    def _made_once(self, final: str, build: Callable[[str], str]) -> str:
        """`final`, made (under the lock, if no one has yet) by renaming what `build` made
        in a staging directory it is given: a failure leaves nothing."""
        if os.path.isdir(final):
            return final
        with self._locked():
            if os.path.isdir(final):
                return final
            staging = tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"))
            try:
                os.rename(build(staging), final)
            finally:
                _remove_tree(staging)
        return final

    def disk_usage(self) -> int:
        """Bytes the store takes on disk (blobs and unpacked root filesystems)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
        return total


SHIFTED = ".shift-"
"""rootfs/<hex><SHIFTED><offset>: `shifted_rootfs`."""


def _normalized(ref: str) -> str:
    try:
        return normalize_reference(ref)
    except ImageError:
        return ref


def _resolve(records: dict[str, dict[str, Any]], ref: str) -> str | None:
    norm = _normalized(ref)
    for digest, record in records.items():
        if norm in record.get("references", []):
            return digest
    key = ref.removeprefix("sha256:")
    if len(key) >= 12 and all(ch in "0123456789abcdef" for ch in key):
        matches = [d for d in records if d[len("sha256:") :].startswith(key)]
        if len(matches) == 1:
            return matches[0]
    return None


def _desc(blob: Blob) -> dict[str, Any]:
    return {"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size}


def _copy_blob(src: Source, blob: Blob, staging: str) -> Blob:
    """Copy a blob into staging while hashing it (and, for a layer, its uncompressed tar);
    return it with its digest, size and media type filled in. Every mismatch is refused."""
    what = f"{src.path}: blob {blob.digest or blob.name}"
    raw = hashlib.sha256()
    plain = hashlib.sha256()
    size = 0
    decoder: archive.LayerDecoder | None = None
    tmp = os.path.join(staging, f".part-{os.getpid()}")
    try:
        with src.open(blob.name) as f, open(tmp, "wb") as out:
            while chunk := f.read(_CHUNK):
                if size == 0:
                    decoder = archive.LayerDecoder.for_head(chunk, what)
                size += len(chunk)
                raw.update(chunk)
                out.write(chunk)
                if blob.diff_id:
                    plain.update(decoder.feed(chunk) if decoder is not None else chunk)
            if decoder is not None and blob.diff_id:
                plain.update(decoder.finish())
    except (EOFError, zlib.error, OSError) as e:
        _remove_tree(tmp)
        raise ImageError(f"{what} is truncated or corrupt: {e}") from None
    except Exception:
        _remove_tree(tmp)
        raise
    digest = "sha256:" + raw.hexdigest()
    problems = []
    if blob.digest and digest != blob.digest:
        problems.append(f"digest mismatch: expected {blob.digest}, content hashes to {digest}")
    if blob.size >= 0 and size != blob.size:
        problems.append(f"size mismatch: {size} bytes, {blob.size} expected")
    if blob.diff_id and "sha256:" + plain.hexdigest() != blob.diff_id:
        problems.append(
            f"layer digest mismatch: the config says {blob.diff_id}, "
            f"the layer hashes to sha256:{plain.hexdigest()}"
        )
    if problems:
        _remove_tree(tmp)
        raise ImageError(f"{what}: {'; '.join(problems)}")
    os.rename(tmp, os.path.join(staging, digest[len("sha256:") :]))
    media = blob.media_type
    if not media:
        kind = decoder.kind if decoder is not None else ""
        media = archive.MT_OCI_LAYER + (f"+{kind}" if kind else "")
    return Blob(name=blob.name, digest=digest, size=size, media_type=media, diff_id=blob.diff_id)


def _remove_tree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
