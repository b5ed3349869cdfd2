"""`virtc image import|ls|inspect|rm`: the local image store, registered on import."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .app import Globals
from .output import emit_json, line, table
from .registry import Arg, command, group

if TYPE_CHECKING:
    from ..images import ImageStore

group("image", "OCI images: import without a registry, list, inspect, remove.")

STORE = Arg(
    "--store",
    help="Image store directory (default: $VC_IMAGE_ROOT, /var/lib/virtcontainers/images as "
    "root, else the user's data dir).",
)
REF = Arg("ref", help="Reference, digest or id.")


def _store(root: str | None) -> ImageStore:
    from ..images import ImageStore

    return ImageStore(root)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n} B"


@command(
    "image import",
    Arg("file", help="docker save archive, OCI archive or OCI layout."),
    Arg("--name", help="Reference (name[:tag]) to give the image."),
    STORE,
)
def import_(g: Globals, a: argparse.Namespace) -> None:
    """Import an image from a file or directory; prints its reference."""
    for image in _store(a.store).import_archive(a.file, a.name):
        line(image.name)


@command(
    "image ls",
    Arg("--json", dest="json_output", action="store_true", help="Machine-readable output."),
    STORE,
)
def ls(g: Globals, a: argparse.Namespace) -> None:
    """List the images in the store."""
    images = _store(a.store).images()
    if a.json_output or g.json:
        emit_json([i.to_dict() for i in images])
        return
    import datetime

    rows = []
    for image in images:
        when = datetime.datetime.fromtimestamp(image.imported).strftime("%Y-%m-%d %H:%M")
        for ref in image.references or ["<none>"]:
            rows.append((ref, image.id, _size(image.size), when))
    table(("REFERENCE", "ID", "SIZE", "IMPORTED"), rows)


@command("image inspect", REF, STORE)
def inspect(g: Globals, a: argparse.Namespace) -> None:
    """Show an image's digest, references, layers and config (JSON)."""
    s = _store(a.store)
    image = s.get(a.ref)
    emit_json(image.to_dict() | {"rootfs": s.rootfs_path(image), "in_use_by": s.holders(image)})


@command("image rm", REF, STORE)
def rm(g: Globals, a: argparse.Namespace) -> None:
    """Remove a reference (and the image with its last one); refused while a sandbox uses it."""
    from ..inventory import list_sandboxes

    live = {i.id for i in list_sandboxes(g.run_root) if i.state not in ("dead", "stopped")}
    image = _store(a.store).remove(a.ref, alive=lambda holder: holder in live)
    line(f"removed {a.ref} ({image.digest})")
