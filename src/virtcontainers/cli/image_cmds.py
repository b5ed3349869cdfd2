"""`virtc image import|ls|inspect|rm`: the local image store.

Register with:
    from .image_cmds import image_app
    app.add_typer(image_app, name="image")
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from .app import emit_json, get_globals, out

if TYPE_CHECKING:
    from ..images import ImageStore

image_app = typer.Typer(help="OCI images: import without a registry, list, inspect, remove.")

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Image store directory (default: /var/lib/virtcontainers/images as root, "
        "else the user's data dir).",
        envvar="VC_IMAGE_ROOT",
    ),
]


def _store(root: str | None) -> ImageStore:
    from ..images import ImageStore

    return ImageStore(root)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


@image_app.command("import")
def import_(
    file: Annotated[str, typer.Argument(help="docker save archive, OCI archive or OCI layout.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Reference (name[:tag]) to give the image.")
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Import an image from a file or directory; prints its reference."""
    for image in _store(store).import_archive(file, name):
        out.print(image.name, markup=False, highlight=False)


@image_app.command("ls")
def ls(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    store: StoreOpt = None,
) -> None:
    """List the images in the store."""
    from rich.table import Table

    images = _store(store).images()
    if json_output or get_globals(ctx).json:
        emit_json([i.to_dict() for i in images])
        return
    table = Table(box=None)
    for column in ("REFERENCE", "ID", "SIZE", "IMPORTED"):
        table.add_column(column)
    for image in images:
        when = datetime.datetime.fromtimestamp(image.imported).strftime("%Y-%m-%d %H:%M")
        for ref in image.references or ["<none>"]:
            table.add_row(ref, image.id, _size(image.size), when)
    out.print(table)


@image_app.command("inspect")
def inspect(
    ref: Annotated[str, typer.Argument(help="Reference, digest or id.")],
    store: StoreOpt = None,
) -> None:
    """Show an image's digest, references, layers and config (JSON)."""
    s = _store(store)
    image = s.get(ref)
    emit_json(image.to_dict() | {"rootfs": s.rootfs_path(image), "in_use_by": s.holders(image)})


@image_app.command("rm")
def rm(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Reference, digest or id.")],
    store: StoreOpt = None,
) -> None:
    """Remove a reference (and the image with its last one); refused while a sandbox uses it."""
    from ..sandbox import Sandbox

    g = get_globals(ctx)
    live = {i.id for i in Sandbox.list(g.run_root) if i.state not in ("dead", "stopped")}
    image = _store(store).remove(ref, alive=lambda holder: holder in live)
    out.print(f"removed {ref} ({image.digest})", markup=False, highlight=False, soft_wrap=True)
