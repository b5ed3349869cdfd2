"""Subcommands of `virtc`, registered on import."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from ..errors import ConfigError, StateError
from .app import EXIT_TIMED_OUT, app, emit_json, err, get_globals, out

T = TypeVar("T")

disk_app = typer.Typer(help="Hot-add and remove disks.", no_args_is_help=True)
assets_app = typer.Typer(help="Guest kernel and initrd.", no_args_is_help=True)
config_app = typer.Typer(help="Effective configuration.", no_args_is_help=True)
app.add_typer(disk_app, name="disk")
app.add_typer(assets_app, name="assets")
app.add_typer(config_app, name="config")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh event loop."""
    return asyncio.run(coro)


def parse_size_mib(text: str) -> int:
    """Parse a memory size: plain MiB ('512'), or with a unit ('512M', '2G', '1024MiB')."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = 1
    if t.endswith("G"):
        factor, t = 1024, t[:-1]
    elif t.endswith("M"):
        t = t[:-1]
    try:
        value = int(t) * factor
    except ValueError:
        raise ConfigError(f"invalid memory size {text!r} (e.g. 512, 512M, 2G)") from None
    if value <= 0:
        raise ConfigError(f"invalid memory size {text!r}: must be positive")
    return value


def with_spinner(label: str, make: Callable[[], Awaitable[T]], quiet: bool = False) -> T:
    """Run `make()` while a spinner with elapsed time shows on stderr."""
    if quiet or not err.is_terminal:
        return run_async(_await(make))
    start = time.monotonic()

    async def body() -> T:
        with err.status(f"{label} (0.0 s)") as status:
            task = asyncio.ensure_future(_await(make))
            while not task.done():
                await asyncio.wait({task}, timeout=0.1)
                status.update(f"{label} ({time.monotonic() - start:.1f} s)")
            return task.result()

    return run_async(body())


async def _await(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


def _overrides(
    cpus: int | None,
    memory: str | None,
    extra: list[str],
    kernel: str | None = None,
    initrd: str | None = None,
) -> dict[str, Any]:
    """HypervisorConfig overrides from the shared sizing and guest-asset options."""
    o: dict[str, Any] = {}
    if cpus is not None:
        if cpus <= 0:
            raise ConfigError(f"invalid --cpus {cpus}: must be positive")
        o["num_vcpus"] = cpus
    if memory is not None:
        o["memory_size"] = parse_size_mib(memory)
    if extra:
        from ..types import Param, params_from_string

        params: list[Param] = []
        for e in extra:
            params.extend(params_from_string(e))
        o["kernel_params"] = params
    for flag, path, field in (
        ("--kernel", kernel, "kernel_path"),
        ("--initrd", initrd, "initrd_path"),
    ):
        if path is not None:
            if not os.path.exists(path):
                raise ConfigError(f"{flag}: no such file {path}")
            o[field] = os.path.abspath(path)
    return o


def _load_config(path: str | None, hypervisor: str) -> Any:
    if path is None:
        return None
    from ..config import HypervisorConfig

    if not os.path.exists(path):
        raise ConfigError(f"--config: no such file {path}")
    return HypervisorConfig.from_toml(path, hypervisor=hypervisor)


CpusOpt = Annotated[int | None, typer.Option("--cpus", "-c", help="vCPUs.")]
MemOpt = Annotated[str | None, typer.Option("--memory", "-m", help="Memory, e.g. 512M or 2G.")]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", help="A Kata configuration.toml to start from.")
]
KernelOpt = Annotated[str | None, typer.Option("--kernel", help="Guest kernel path.")]
InitrdOpt = Annotated[str | None, typer.Option("--initrd", help="Guest initrd path.")]
ParamOpt = Annotated[
    list[str] | None, typer.Option("--kernel-param", help="Extra kernel parameters.")
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Boot timeout in seconds.")]
NetOpt = Annotated[
    str | None,
    typer.Option(
        "--net",
        help="Network: none (loopback only), bridge[:NAME] (NAT, -p), ns:PATH (join a "
        "namespace), user (QEMU user-mode, no root). Default: bridge with -p, else no NIC.",
    ),
]
PublishOpt = Annotated[
    list[str] | None,
    typer.Option("--publish", "-p", help="Publish a port: [IP:]HOST_PORT:GUEST_PORT[/tcp|udp]."),
]
SubnetOpt = Annotated[
    str | None, typer.Option("--subnet", help="IPv4 subnet of the bridge (made on first use).")
]


def _new_sandbox(
    ctx: typer.Context,
    name: str | None,
    cpus: int | None,
    memory: str | None,
    config: str | None,
    kernel: str | None,
    initrd: str | None,
    params: list[str] | None,
    timeout: float,
    net: str | None = None,
    publish: list[str] | None = None,
    subnet: str | None = None,
    **workload: Any,
) -> Any:
    """A Sandbox from the shared options; `workload`: image, bundle, mounts (see Sandbox)."""
    from ..sandbox import Sandbox

    g = get_globals(ctx)
    overrides = _overrides(cpus, memory, params or [], kernel, initrd)
    network = None
    if net or publish or subnet:
        from ..network import NetworkConfig

        network = NetworkConfig.parse(net or "bridge", publish or [], subnet=subnet or "")
    return Sandbox(
        name,
        g.hypervisor,
        _load_config(config, g.hypervisor),
        run_root=g.run_root,
        start_timeout=timeout,
        network=network,
        **workload,
        **overrides,
    )


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None,
        typer.Argument(help="Command to run (with --image: instead of the image's Cmd)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Sandbox id.")] = None,
    cpus: CpusOpt = None,
    memory: MemOpt = None,
    config: ConfigOpt = None,
    kernel: KernelOpt = None,
    initrd: InitrdOpt = None,
    kernel_param: ParamOpt = None,
    timeout: TimeoutOpt = 60.0,
    exec_timeout: Annotated[
        float | None, typer.Option("--exec-timeout", help="Command timeout in seconds.")
    ] = None,
    stdin: Annotated[bool, typer.Option("--stdin", "-i", help="Send our stdin.")] = False,
    from_template: Annotated[
        str | None, typer.Option("--from-template", help="Clone from this VM template.")
    ] = None,
    factory: Annotated[
        bool, typer.Option("--factory", help="Take a ready VM from the VM cache server.")
    ] = False,
    net: NetOpt = None,
    publish: PublishOpt = None,
    subnet: SubnetOpt = None,
    image: Annotated[
        str | None, typer.Option("--image", help="Run this image (virtc image ls) as a container.")
    ] = None,
    bundle: Annotated[
        str | None, typer.Option("--bundle", help="Run this OCI runtime bundle as a container.")
    ] = None,
    volume: Annotated[
        list[str] | None,
        typer.Option("--volume", "-v", help="Share a host directory: HOST:GUEST[:ro]."),
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="Container environment: K=V.")
    ] = None,
    workdir: Annotated[
        str | None, typer.Option("--workdir", "-w", help="Container working directory.")
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="Container user: UID[:GID] or a name.")
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Leave the container running; print the id.")
    ] = False,
) -> None:
    """Boot a sandbox, run COMMAND in it (or in a container of --image/--bundle), print its
    output, tear down; exit with its code."""
    data = sys.stdin.buffer.read() if stdin else b""
    container = image is not None or bundle is not None
    if not container and (volume or env or workdir or user or detach):
        raise ConfigError("-v, -e, -w, -u and -d need --image or --bundle")
    if not container and not command:
        raise ConfigError("run: no command given (or use --image/--bundle)")
    workload: dict[str, Any] = {}
    if container:
        workload = {"image": image, "bundle": bundle, "mounts": volume or []}
    sb = _new_sandbox(
        ctx,
        name,
        cpus,
        memory,
        config,
        kernel,
        initrd,
        kernel_param,
        timeout,
        net,
        publish,
        subnet,
        **workload,
    )
    if container:
        from .container_cmds import run_container

        run_container(ctx, sb, command, env, workdir, user, data, exec_timeout, detach)
        return
    assert command is not None

    async def body() -> Any:
        if from_template or factory:
            from ..sandbox import build_config
            from .factory_cmds import sandbox_from_factory

            g = get_globals(ctx)
            cfg = build_config(sb.config_request, sb.overrides, sb.hypervisor_type)
            fsb = await sandbox_from_factory(
                cfg,
                template=from_template,
                use_cache=factory,
                run_root=g.run_root,
                id=name,
                timeout=timeout,
            )
            async with fsb:
                return await fsb.exec(command, stdin=data, timeout=exec_timeout)
        async with sb:
            return await sb.exec(command, stdin=data, timeout=exec_timeout)

    result = with_spinner("booting sandbox", body, quiet=get_globals(ctx).json)
    _print_result(ctx, result)


def _print_result(ctx: typer.Context, result: Any) -> None:
    if get_globals(ctx).json:
        emit_json(
            {
                "exit_code": result.exit_code,
                "stdout": result.stdout.decode(errors="replace"),
                "stderr": result.stderr.decode(errors="replace"),
                "signal": result.signal,
                "timed_out": result.timed_out,
            }
        )
    else:
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.buffer.flush()
        sys.stderr.buffer.write(result.stderr)
        sys.stderr.buffer.flush()
    if result.timed_out:
        err.print("virtc: command timed out (killed in the guest)", markup=False)
        raise typer.Exit(EXIT_TIMED_OUT)
    if result.signal:
        raise typer.Exit(128 + result.signal)
    raise typer.Exit(result.exit_code)


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option("--name", help="Sandbox id.")] = None,
    cpus: CpusOpt = None,
    memory: MemOpt = None,
    config: ConfigOpt = None,
    kernel: KernelOpt = None,
    initrd: InitrdOpt = None,
    kernel_param: ParamOpt = None,
    timeout: TimeoutOpt = 60.0,
    start: Annotated[bool, typer.Option("--start", help="Start it right away.")] = False,
    net: NetOpt = None,
    publish: PublishOpt = None,
    subnet: SubnetOpt = None,
) -> None:
    """Create a sandbox (and start it with --start); prints its id."""
    sb = _new_sandbox(
        ctx, name, cpus, memory, config, kernel, initrd, kernel_param, timeout, net, publish, subnet
    )

    async def body() -> None:
        await sb.create()
        if start:
            await sb.start()
            await sb.detach()

    with_spinner("booting sandbox" if start else "creating sandbox", body)
    _say(ctx, {"id": sb.id, "state": sb.state.value}, sb.id)


def _say(ctx: typer.Context, data: dict[str, Any], text: str) -> None:
    if get_globals(ctx).json:
        emit_json(data)
    else:
        out.print(text, markup=False, highlight=False)


async def _attach(ctx: typer.Context, sandbox_id: str) -> Any:
    from ..sandbox import Sandbox

    return await Sandbox.attach(sandbox_id, run_root=get_globals(ctx).run_root)


IdArg = Annotated[str, typer.Argument(help="Sandbox id.", show_default=False)]


@app.command()
def start(ctx: typer.Context, sandbox_id: IdArg) -> None:
    """Start a created sandbox."""

    async def body() -> None:
        sb = await _attach(ctx, sandbox_id)
        if sb.state.value != "created":
            raise StateError(f"sandbox {sandbox_id} is {sb.state.value}, not created")
        await sb.start()
        await sb.detach()

    with_spinner("booting sandbox", body)
    _say(ctx, {"id": sandbox_id, "state": "running"}, sandbox_id)


@app.command()
def stop(
    ctx: typer.Context,
    sandbox_id: IdArg,
    force: Annotated[bool, typer.Option("--force", "-f", help="Kill instead of shutdown.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 30.0,
) -> None:
    """Stop a sandbox and remove it."""

    async def body() -> None:
        sb = await _attach(ctx, sandbox_id)
        await asyncio.wait_for(sb.stop(force=force), timeout)

    run_async(body())
    _say(ctx, {"id": sandbox_id, "state": "stopped"}, sandbox_id)


@app.command()
def kill(ctx: typer.Context, sandbox_id: IdArg) -> None:
    """Kill a sandbox's VM at once (SIGKILL) and remove it."""

    async def body() -> None:
        sb = await _attach(ctx, sandbox_id)
        await sb.stop(force=True)

    run_async(body())
    _say(ctx, {"id": sandbox_id, "state": "stopped"}, sandbox_id)


def _act(ctx: typer.Context, sandbox_id: str, action: str, new_state: str) -> None:
    """Attach, call `Sandbox.<action>()`, let go; report the new state."""

    async def body() -> None:
        sb = await _attach(ctx, sandbox_id)
        try:
            await getattr(sb, action)()
        finally:
            await sb.detach()

    run_async(body())
    _say(ctx, {"id": sandbox_id, "state": new_state}, sandbox_id)


@app.command()
def pause(ctx: typer.Context, sandbox_id: IdArg) -> None:
    """Pause a running sandbox."""
    _act(ctx, sandbox_id, "pause", "paused")


@app.command()
def resume(ctx: typer.Context, sandbox_id: IdArg) -> None:
    """Resume a paused sandbox."""
    _act(ctx, sandbox_id, "resume", "running")


@app.command("list")
def list_(
    ctx: typer.Context,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only ids.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List sandboxes."""
    from ..sandbox import Sandbox

    infos = Sandbox.list(get_globals(ctx).run_root)
    if json_output or get_globals(ctx).json:
        emit_json([i.to_dict() for i in infos])
        return
    if quiet:
        for i in infos:
            out.print(i.id, markup=False, highlight=False)
        return
    table = Table(box=None)
    for col in ("ID", "HYPERVISOR", "STATE", "PID", "VCPUS", "MEMORY", "IP", "CREATED"):
        table.add_column(col)
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_at))
        table.add_row(
            i.id,
            i.hypervisor,
            i.state,
            str(i.pid),
            str(i.vcpus),
            f"{i.memory_mb} MiB",
            i.ip or "-",
            created,
        )
    out.print(table)


@app.command()
def inspect(ctx: typer.Context, sandbox_id: IdArg) -> None:
    """Print everything known about a sandbox as JSON."""
    from .. import persist
    from ..sandbox import recorded_state

    store = persist.StateStore(persist.run_root(get_globals(ctx).run_root))
    if not store.exists(sandbox_id):
        raise StateError(f"no such sandbox: {sandbox_id}")
    doc = store.read(sandbox_id)
    state = recorded_state(store, sandbox_id, doc)
    if isinstance(doc.get("sandbox"), dict) and state:
        doc["sandbox"]["state"] = state
    hv = doc.get("hypervisor")
    if isinstance(hv, dict) and hv.get("vm_state") in ("running", "paused") and state:
        hv["vm_state"] = state
    record = doc.get("sandbox", {}).get("network")
    if record:
        from ..network import SandboxNetwork

        # Addresses and published ports first; the full record stays under "sandbox".
        doc = {"network": SandboxNetwork.from_dict(record).summary(), **doc}
    emit_json(doc)


@app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_(
    ctx: typer.Context,
    sandbox_id: IdArg,
    command: Annotated[list[str], typer.Argument(help="Command to run in the guest.")],
    exec_timeout: Annotated[
        float | None, typer.Option("--timeout", help="Command timeout in seconds.")
    ] = None,
    stdin: Annotated[bool, typer.Option("--stdin", "-i", help="Send our stdin.")] = False,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE.")] = None,
    cwd: Annotated[str | None, typer.Option("--cwd", "-w", help="Working directory.")] = None,
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="In a container: UID[:GID] or a name.")
    ] = None,
) -> None:
    """Run a command in a running sandbox (inside its container when it has one)."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("exec: no command given")
    data = sys.stdin.buffer.read() if stdin else b""
    env_map: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env: expected KEY=VALUE, got {item!r}")
        env_map[key] = value

    async def body() -> Any:
        sb = await _attach(ctx, sandbox_id)
        try:
            if sb.containers:
                from .container_cmds import exec_in_container

                return await exec_in_container(sb, command, env, cwd, user, data, exec_timeout)
            if user:
                raise ConfigError("exec: --user needs a sandbox with a container")
            return await sb.exec(
                command, stdin=data, env=env_map or None, cwd=cwd, timeout=exec_timeout
            )
        finally:
            await sb.detach()

    _print_result(ctx, run_async(body()))


@app.command()
def logs(
    ctx: typer.Context,
    sandbox_id: IdArg,
    vmm: Annotated[bool, typer.Option("--vmm", help="The VMM's own log, not the console.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output until it stops.")
    ] = False,
    tail: Annotated[
        int | None,
        typer.Option(
            "--tail", "-n", min=0, help="Only the last N lines (then, with -f, new ones)."
        ),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Write control characters to a terminal as they are.")
    ] = False,
) -> None:
    """Print the guest console log (or the VMM log)."""
    from ..sandbox import Sandbox
    from .logs import show_logs

    root = get_globals(ctx).run_root
    Sandbox.log_paths_of(sandbox_id, root, vmm=vmm)  # no such sandbox: say so before anything

    def paths() -> list[str]:
        try:
            return Sandbox.log_paths_of(sandbox_id, root, vmm=vmm)
        except StateError:
            return []  # stopped meanwhile: its files went with it

    def running() -> bool:
        try:
            return Sandbox.info(sandbox_id, root).state not in ("dead", "stopped")
        except StateError:
            return False

    def write(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        if follow:
            sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):  # the way to end --follow
        show_logs(
            paths,
            write,
            tail=tail,
            terminal=sys.stdout.isatty() and not raw,
            follow_while=running if follow else None,
        )
    sys.stdout.flush()


@app.command()
def console(
    ctx: typer.Context,
    sandbox_id: IdArg,
    escape: Annotated[str, typer.Option("--escape", help="Escape key: Ctrl-<key>.")] = "]",
) -> None:
    """Attach the terminal to the guest's serial console (Ctrl-] to leave)."""
    from .console import attach_console

    if len(escape) != 1:
        raise ConfigError(f"--escape: expected one character, got {escape!r}")

    async def body() -> tuple[str, list[str]]:
        sb = await _attach(ctx, sandbox_id)
        try:
            return await sb.console_path(), sb.log_paths()
        finally:
            await sb.detach()

    path, logs = run_async(body())
    attach_console(path, escape, history=logs[-1] if logs else None)  # the newest


@disk_app.command("add")
def disk_add(
    ctx: typer.Context,
    sandbox_id: IdArg,
    path: Annotated[str, typer.Argument(help="Host file to attach.")],
    disk_id: Annotated[str | None, typer.Option("--id", help="Device id.")] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="Attach read-only.")] = False,
) -> None:
    """Hot-add a host file as a disk."""
    if not os.path.exists(path):
        raise ConfigError(f"disk add: no such file {path}")

    async def body() -> Any:
        sb = await _attach(ctx, sandbox_id)
        try:
            return await sb.add_disk(os.path.abspath(path), disk_id, read_only=read_only)
        finally:
            await sb.detach()

    drive = run_async(body())
    _say(ctx, {"id": drive.id, "path": drive.path, "pci_path": drive.pci_path}, drive.id)


@disk_app.command("rm")
def disk_rm(
    ctx: typer.Context,
    sandbox_id: IdArg,
    disk_id: Annotated[str, typer.Argument(help="Device id given by `disk add`.")],
) -> None:
    """Hot-remove a disk."""

    async def body() -> None:
        sb = await _attach(ctx, sandbox_id)
        try:
            await sb.remove_disk_by_id(disk_id)
        finally:
            await sb.detach()

    run_async(body())
    _say(ctx, {"id": disk_id, "removed": True}, disk_id)


@app.command()
def resize(
    ctx: typer.Context,
    sandbox_id: IdArg,
    cpus: CpusOpt = None,
    memory: MemOpt = None,
) -> None:
    """Change vCPUs and/or memory of a running sandbox."""
    if cpus is None and memory is None:
        raise ConfigError("resize: give --cpus and/or --memory")
    mem = parse_size_mib(memory) if memory is not None else None

    async def body() -> None:
        sb = await _attach(ctx, sandbox_id)
        try:
            await sb.resize(vcpus=cpus, memory_mb=mem)
        finally:
            await sb.detach()

    run_async(body())
    _say(ctx, {"id": sandbox_id, "cpus": cpus, "memory_mb": mem}, sandbox_id)


@app.command()
def capabilities(
    ctx: typer.Context,
    markdown: Annotated[bool, typer.Option("--markdown", help="As a Markdown table.")] = False,
) -> None:
    """What each hypervisor (and QEMU machine type) supports."""
    from .captable import COLUMNS, capability_rows, markdown_table

    if markdown:
        sys.stdout.write(markdown_table())
        return
    rows = capability_rows()
    if get_globals(ctx).json:
        emit_json({label: caps.names() for label, caps in rows})
        return
    table = Table(box=None)
    table.add_column("HYPERVISOR")
    for c in COLUMNS:
        table.add_column((c.name or "").lower().replace("_", " "))
    for label, caps in rows:
        table.add_row(label, *("[green]yes[/]" if c in caps else "-" for c in COLUMNS))
    out.print(table)


@assets_app.command("build")
def assets_build(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False,
) -> None:
    """Build (or reuse) the guest kernel and initrd."""
    from .. import guest

    assets = guest.build_assets(force=force)
    err.print(f"kernel {assets.kernel_version}: {assets.kernel}", markup=False, highlight=False)
    err.print(f"initrd: {assets.initrd}", markup=False, highlight=False)


@assets_app.command("show")
def assets_show(ctx: typer.Context) -> None:
    """Show the cached guest assets."""
    from .. import guest

    info = guest.asset_info()
    if get_globals(ctx).json:
        emit_json(info)
    else:
        out.print_json(json.dumps(info, default=str))


@assets_app.command("prune")
def assets_prune(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be removed.")
    ] = False,
) -> None:
    """Remove cached guest assets that the current inputs no longer use."""
    from .. import guest

    stale = guest.prune_assets(dry_run=dry_run)
    if get_globals(ctx).json:
        emit_json({"dry_run": dry_run, "stale": [{"name": e.name, "size": e.size} for e in stale]})
        return
    verb = "would remove" if dry_run else "removed"
    for e in stale:
        out.print(f"{verb} {e.path} ({e.size / 2**20:.1f} MiB)", soft_wrap=True, markup=False)
    total = sum(e.size for e in stale) / 2**20
    err.print(f"{verb} {len(stale)} stale entries, {total:.1f} MiB", markup=False, highlight=False)


@config_app.command("show")
def config_show(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Print the effective configuration (defaults filled in) as JSON."""
    from ..config import HypervisorConfig
    from ..sandbox import build_config
    from ..types import HypervisorType

    g = get_globals(ctx)
    base = _load_config(config, g.hypervisor) if config else HypervisorConfig()
    cfg = build_config(base, {}, HypervisorType.parse(g.hypervisor))
    emit_json(cfg.to_dict())
