"""`virtc template create|list|rm` and `virtc factory init|status|destroy`, registered on
import (the factory itself is imported inside each command)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .app import Globals
from .options import GUEST, TIMEOUT, config_request, guest_options_given
from .output import emit_json, line, run_async, table, with_spinner
from .registry import Arg, command, group

if TYPE_CHECKING:
    from ..config import HypervisorConfig
    from ..factory import TemplateStore

group("template", "VM templates: boot once, clone in a tenth of a second.")
group("factory", "The VM cache server: a pool of ready VMs.")

DIRECTORY = Arg(
    "--dir",
    dest="directory",
    help="Directory for the template's memory and state files (default: a tmpfs mounted "
    "under the run root; needs root).",
)
TEMPLATES = Arg("--templates", help="Template store (default: <run root>/templates).")
VIRTIO_FS = Arg(
    "--virtio-fs",
    action="store_true",
    help="VMs for containers (run --image/--bundle/-v): shares hot-added over virtio-fs "
    "(a clone then gets its own copy of the template's memory).",
)


def qemu_config(g: Globals, a: argparse.Namespace) -> HypervisorConfig:
    """The validated QEMU config the `GUEST` options describe (as `virtc run` reads them);
    with --virtio-fs, for containers (as `virtc run --image` asks for)."""
    from ..sandbox import build_config
    from ..types import HypervisorType

    if g.hypervisor != "qemu":
        raise ConfigError(f"the VM factory supports QEMU only, not {g.hypervisor} (-H qemu)")
    config, overrides = config_request(g, a)
    if getattr(a, "virtio_fs", False):
        overrides["shared_fs"] = "virtio-fs"
    return build_config(config, overrides, HypervisorType.QEMU)


def _store(g: Globals, templates: str | None) -> TemplateStore:
    from ..factory import TemplateStore

    return TemplateStore(templates, run_root=g.run_root)


def _when(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# -- virtc template ---------------------------------------------------------------------------
@command(
    "template create",
    Arg("name", help="Template name."),
    *GUEST,
    VIRTIO_FS,
    DIRECTORY,
    TEMPLATES,
    TIMEOUT,
)
def template_create(g: Globals, a: argparse.Namespace) -> None:
    """Boot a VM, wait for its agent and save it as template NAME."""
    cfg = qemu_config(g, a)
    store = _store(g, a.templates)
    info = with_spinner(
        f"creating template {a.name}",
        lambda: store.create(a.name, cfg, directory=a.directory, timeout=a.timeout),
        quiet=g.json,
    )
    if g.json:
        emit_json(info.model_dump(mode="json"))
        return
    where = "tmpfs " if info.tmpfs else ""
    line(
        f"template {a.name}: {info.num_vcpus} vCPU, {info.memory_mib} MiB, booted in "
        f"{info.boot_seconds:.1f} s; files on {where}{info.directory}"
    )


@command("template list", TEMPLATES)
def template_list(g: Globals, a: argparse.Namespace) -> None:
    """List templates (broken ones with the reason)."""
    entries = _store(g, a.templates).list()
    if g.json:
        emit_json(
            [
                {
                    "name": e.name,
                    "ok": e.info is not None,
                    "problem": e.problem,
                    "info": e.info.model_dump(mode="json") if e.info else None,
                }
                for e in entries
            ]
        )
        return
    rows: list[tuple[Any, ...]] = []
    for e in entries:
        i = e.info
        if i is None:
            rows.append((e.name, "", "", "", "", "", f"broken: {e.problem}"))
            continue
        version = i.qemu_version.removeprefix("QEMU emulator version ").split(" ")[0]
        rows.append(
            (
                e.name,
                i.num_vcpus,
                f"{i.memory_mib} MiB",
                version,
                _when(i.created_at),
                i.directory,
                "ok",
            )
        )
    table(("NAME", "VCPUS", "MEMORY", "QEMU", "CREATED", "FILES", "STATUS"), rows, "templates")


@command("template rm", Arg("names", nargs="+", metavar="NAME", help="Template names."), TEMPLATES)
def template_rm(g: Globals, a: argparse.Namespace) -> None:
    """Remove templates (running clones keep working)."""
    store = _store(g, a.templates)
    for name in a.names:
        store.remove(name)
        if not g.json:
            line(f"removed template {name}")
    if g.json:
        emit_json({"removed": a.names})


# -- virtc factory ----------------------------------------------------------------------------
@command(
    "factory init",
    Arg("--size", "-n", type=int, default=2, help="VMs to keep ready (default: 2)."),
    Arg("--template", "-t", help="Clone this template (else boot)."),
    TEMPLATES,
    Arg("--concurrency", type=int, default=1, help="VMs made at the same time (default: 1)."),
    Arg("--wait", action="store_true", help="Return once the pool is full."),
    *GUEST,
    VIRTIO_FS,
    TIMEOUT,
)
def factory_init(g: Globals, a: argparse.Namespace) -> None:
    """Start the VM cache server in the background (pid file and socket under the run root)."""
    from .. import persist
    from ..factory import DaemonSpec, VMConfig, paths, start_daemon
    from ..types import HypervisorType

    vm_config: dict[str, Any] = {}
    if a.template is None:
        vm_config = VMConfig.of(qemu_config(g, a), HypervisorType.QEMU).to_dict()
    elif guest_options_given(a) or a.virtio_fs:
        raise ConfigError("factory init: with --template the VM config is the template's")
    root = persist.run_root(g.run_root)
    spec = DaemonSpec(
        size=a.size,
        template=a.template or "",
        template_root=os.path.abspath(a.templates) if a.templates else None,
        vm_config=vm_config,
        concurrency=a.concurrency,
        boot_timeout=a.timeout,
    )
    pid = run_async(start_daemon(spec, run_root=root))
    if a.wait:
        with_spinner("filling the VM cache", lambda: _wait_full(root, a.size, a.timeout), g.json)
    data = {"pid": pid, "socket": paths.socket_path(root), "size": a.size}
    if g.json:
        emit_json(data)
    else:
        line(f"VM cache server running (pid {pid}, {a.size} VMs, socket {data['socket']})")


async def _wait_full(root: str, size: int, timeout: float) -> None:
    import asyncio

    from ..factory import FactoryError, daemon_status

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout * size
    while True:
        st = await daemon_status(root)
        if len(st.vms) >= size:
            return
        if loop.time() >= deadline:
            raise FactoryError(
                f"the VM cache has {len(st.vms)} of {size} VMs"
                + (f" (last failure: {st.last_error})" if st.last_error else "")
            )
        await asyncio.sleep(0.2)


@command("factory status")
def factory_status(g: Globals, a: argparse.Namespace) -> None:
    """Show the VM cache server and its pooled VMs."""
    from ..factory import daemon_status

    st = run_async(daemon_status(g.run_root))
    if g.json:
        emit_json(st.to_dict())
        return
    line(
        f"VM cache server pid {st.pid}: {len(st.vms)}/{st.size} ready, {st.booting} booting, "
        f"{st.waiting} waiting, {st.handed_out} handed out; base {st.base}"
    )
    if st.last_error:
        from .logs import terminal_safe

        line(f"last failure: {terminal_safe(st.last_error)}")
    table(
        ("ID", "PID", "VCPUS", "MEMORY", "STATE", "CREATED"),
        [(v.id, v.pid, v.cpu, f"{v.memory_mb} MiB", v.state, _when(v.created_at)) for v in st.vms],
    )


@command("factory destroy")
def factory_destroy(g: Globals, a: argparse.Namespace) -> None:
    """Stop the VM cache server and its pooled VMs (also cleans up after a killed server)."""
    from ..factory import stop_daemon

    reaped = run_async(stop_daemon(g.run_root))
    if g.json:
        emit_json({"stopped": True, "leftover_vms_stopped": reaped})
        return
    line("VM cache server stopped")
    if reaped:
        line(f"stopped {len(reaped)} VM(s) a dead server had left")
