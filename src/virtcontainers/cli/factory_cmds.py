"""`virtc template create|list|rm` and `virtc factory init|status|destroy`, plus the helper
`virtc run --from-template NAME` / `virtc run --factory` use to get a sandbox from the factory.

Register with:
    from .factory_cmds import factory_app, template_app
    app.add_typer(template_app, name="template")
    app.add_typer(factory_app, name="factory")
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ..errors import ConfigError
from ..types import HypervisorType
from .app import emit_json, get_globals, out
from .commands import (
    ConfigOpt,
    CpusOpt,
    InitrdOpt,
    KernelOpt,
    MemOpt,
    ParamOpt,
    TimeoutOpt,
    _load_config,
    _overrides,
    run_async,
    with_spinner,
)

if TYPE_CHECKING:
    from ..config import HypervisorConfig
    from ..factory import VM
    from ..sandbox import Sandbox

log = logging.getLogger(__name__)

template_app = typer.Typer(help="VM templates: boot once, clone in a tenth of a second.")
factory_app = typer.Typer(help="The VM cache server: a pool of ready VMs.")

DirOpt = Annotated[
    str | None,
    typer.Option(
        "--dir",
        help="Directory for the template's memory and state files (default: a tmpfs "
        "mounted under the run root; needs root).",
    ),
]
TemplateDirOpt = Annotated[
    str | None,
    typer.Option("--templates", help="Template store (default: <run root>/templates)."),
]


def build_config(
    ctx: typer.Context,
    cpus: int | None,
    memory: str | None,
    config: str | None,
    kernel: str | None,
    initrd: str | None,
    params: list[str] | None,
) -> HypervisorConfig:
    """The validated QEMU config the options describe (same rules as `virtc run`)."""
    from ..sandbox import build_config as sandbox_build_config

    g = get_globals(ctx)
    if g.hypervisor != "qemu":
        raise ConfigError(f"the VM factory supports QEMU only, not {g.hypervisor} (-H qemu)")
    overrides = _overrides(cpus, memory, params or [], kernel, initrd)
    base = _load_config(config, g.hypervisor)
    cfg: HypervisorConfig = sandbox_build_config(base, overrides, HypervisorType.QEMU)
    return cfg


def _store(ctx: typer.Context, templates: str | None) -> Any:
    from ..factory import TemplateStore

    return TemplateStore(templates, run_root=get_globals(ctx).run_root)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# -- virtc template ---------------------------------------------------------------------------
@template_app.command("create")
def template_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Template name.")],
    cpus: CpusOpt = None,
    memory: MemOpt = None,
    config: ConfigOpt = None,
    kernel: KernelOpt = None,
    initrd: InitrdOpt = None,
    kernel_param: ParamOpt = None,
    directory: DirOpt = None,
    templates: TemplateDirOpt = None,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Boot a VM, wait for its agent and save it as template NAME."""
    cfg = build_config(ctx, cpus, memory, config, kernel, initrd, kernel_param)
    store = _store(ctx, templates)
    info = with_spinner(
        f"creating template {name}",
        lambda: store.create(name, cfg, directory=directory, timeout=timeout),
        quiet=get_globals(ctx).json,
    )
    if get_globals(ctx).json:
        emit_json(info.model_dump(mode="json"))
        return
    where = "tmpfs " if info.tmpfs else ""
    out.print(
        f"template {name}: {info.num_vcpus} vCPU, {info.memory_mib} MiB, booted in "
        f"{info.boot_seconds:.1f} s; files on {where}{info.directory}",
        markup=False,
        highlight=False,
    )


@template_app.command("list")
def template_list(ctx: typer.Context, templates: TemplateDirOpt = None) -> None:
    """List templates (broken ones with the reason)."""
    entries = _store(ctx, templates).list()
    if get_globals(ctx).json:
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
    table = Table(title="templates")
    for col in ("name", "vCPU", "memory", "QEMU", "created", "files", "status"):
        table.add_column(col)
    for e in entries:
        if e.info is None:
            table.add_row(e.name, "", "", "", "", "", f"[red]broken[/]: {e.problem}")
            continue
        i = e.info
        version = i.qemu_version.removeprefix("QEMU emulator version ").split(" ")[0]
        table.add_row(
            e.name,
            str(i.num_vcpus),
            f"{i.memory_mib} MiB",
            version,
            _when(i.created_at),
            i.directory,
            "ok",
        )
    out.print(table)


@template_app.command("rm")
def template_rm(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="Template names.")],
    templates: TemplateDirOpt = None,
) -> None:
    """Remove templates (running clones keep working)."""
    store = _store(ctx, templates)
    for name in names:
        store.remove(name)
        if not get_globals(ctx).json:
            out.print(f"removed template {name}", markup=False, highlight=False)
    if get_globals(ctx).json:
        emit_json({"removed": names})


# -- virtc factory ----------------------------------------------------------------------------
@factory_app.command("init")
def factory_init(
    ctx: typer.Context,
    size: Annotated[int, typer.Option("--size", "-n", help="VMs to keep ready.")] = 2,
    template: Annotated[
        str | None, typer.Option("--template", "-t", help="Clone this template (else boot).")
    ] = None,
    templates: TemplateDirOpt = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="VMs made at the same time.")
    ] = 1,
    wait: Annotated[bool, typer.Option("--wait", help="Return once the pool is full.")] = False,
    cpus: CpusOpt = None,
    memory: MemOpt = None,
    config: ConfigOpt = None,
    kernel: KernelOpt = None,
    initrd: InitrdOpt = None,
    kernel_param: ParamOpt = None,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Start the VM cache server in the background (pid file and socket under the run root)."""
    from .. import persist
    from ..factory import DaemonSpec, paths, start_daemon
    from ..factory.vmconfig import VMConfig

    g = get_globals(ctx)
    vm_config: dict[str, Any] = {}
    if template is None:
        cfg = build_config(ctx, cpus, memory, config, kernel, initrd, kernel_param)
        vm_config = VMConfig.of(cfg, HypervisorType.QEMU).to_dict()
    elif any(v is not None for v in (cpus, memory, config, kernel, initrd, kernel_param)):
        raise ConfigError("factory init: with --template the VM config is the template's")
    root = persist.run_root(g.run_root)
    spec = DaemonSpec(
        size=size,
        template=template or "",
        template_root=os.path.abspath(templates) if templates else None,
        vm_config=vm_config,
        concurrency=concurrency,
        boot_timeout=timeout,
    )
    pid = run_async(start_daemon(spec, run_root=root))
    if wait:
        with_spinner("filling the VM cache", lambda: _wait_full(root, size, timeout), g.json)
    data = {"pid": pid, "socket": paths.socket_path(root), "size": size}
    if g.json:
        emit_json(data)
    else:
        out.print(
            f"VM cache server running (pid {pid}, {size} VMs, socket {data['socket']})",
            markup=False,
            highlight=False,
        )


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


@factory_app.command("status")
def factory_status(ctx: typer.Context) -> None:
    """Show the VM cache server and its pooled VMs."""
    from ..factory import daemon_status
    from .logs import terminal_safe

    g = get_globals(ctx)
    st = run_async(daemon_status(g.run_root))
    if g.json:
        emit_json(st.to_dict())
        return
    out.print(
        f"VM cache server pid {st.pid}: {len(st.vms)}/{st.size} ready, {st.booting} booting, "
        f"{st.waiting} waiting, {st.handed_out} handed out; base {st.base}",
        markup=False,
        highlight=False,
    )
    if st.last_error:
        out.print(f"last failure: {terminal_safe(st.last_error)}", markup=False, highlight=False)
    table = Table()
    for col in ("id", "pid", "vCPU", "memory", "state", "created"):
        table.add_column(col)
    for v in st.vms:
        table.add_row(
            v.id, str(v.pid), str(v.cpu), f"{v.memory_mb} MiB", v.state, _when(v.created_at)
        )
    out.print(table)


@factory_app.command("destroy")
def factory_destroy(ctx: typer.Context) -> None:
    """Stop the VM cache server and its pooled VMs (also cleans up after a killed server)."""
    from ..factory import stop_daemon

    g = get_globals(ctx)
    reaped = run_async(stop_daemon(g.run_root))
    if g.json:
        emit_json({"stopped": True, "leftover_vms_stopped": reaped})
        return
    out.print("VM cache server stopped", markup=False, highlight=False)
    if reaped:
        out.print(f"stopped {len(reaped)} VM(s) a dead server had left", markup=False)


# -- for `virtc run --from-template NAME` / `virtc run --factory` ------------------------------
async def factory_vm(
    config: HypervisorConfig,
    *,
    template: str | None = None,
    use_cache: bool = False,
    run_root: str | None = None,
    templates: str | None = None,
    id: str | None = None,
    timeout: float = 60.0,
) -> VM:
    """A running VM with a ready agent: cloned from `template`, or from the run root's VM cache
    server (`use_cache`). A config the template or cache cannot serve, or a cache server
    that is not running, falls back to a direct boot with a log line saying why."""
    from ..factory import CacheUnavailableError, Factory, TemplateStore, VMConfig, boot_vm

    if template and use_cache:
        raise ConfigError("use either a template or the VM cache, not both")
    if template:
        store = TemplateStore(templates, run_root=run_root)
        async with Factory.from_template(template, store=store) as factory:
            return await factory.get_vm(config, id=id, timeout=timeout)
    if use_cache:
        try:
            factory = await Factory.connect(run_root=run_root)
        except CacheUnavailableError as exc:
            log.warning("factory: booting a VM directly: %s", exc)
            return await boot_vm(VMConfig.of(config), id=id, run_root=run_root, timeout=timeout)
        async with factory:
            return await factory.get_vm(config, id=id, timeout=timeout)
    return await boot_vm(VMConfig.of(config), id=id, run_root=run_root, timeout=timeout)


async def sandbox_from_factory(
    config: HypervisorConfig,
    *,
    template: str | None = None,
    use_cache: bool = False,
    run_root: str | None = None,
    templates: str | None = None,
    id: str | None = None,
    timeout: float = 60.0,
) -> Sandbox:
    """A started `Sandbox` around `factory_vm(...)` (its id is the VM's: a pooled VM already
    has one). The VM is stopped if wrapping it fails."""
    from ..factory.vm import stop_quietly

    vm = await factory_vm(
        config,
        template=template,
        use_cache=use_cache,
        run_root=run_root,
        templates=templates,
        id=id,
        timeout=timeout,
    )
    try:
        return await adopt_vm(vm, run_root=run_root)
    except BaseException:
        await stop_quietly(vm)
        raise


async def adopt_vm(vm: VM, *, run_root: str | None = None) -> Sandbox:
    """Wrap a running factory VM in a persisted `Sandbox` (which then owns it)."""
    from ..sandbox import Sandbox

    return Sandbox.adopt(vm.hypervisor, await vm.agent(), vm.agent_endpoint, run_root=run_root)
