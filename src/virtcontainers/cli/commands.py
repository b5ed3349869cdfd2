"""The sandbox commands of `virtc` (run, create, exec, list, ...) and the host ones (check,
capabilities, assets, config), registered on import.

Each command imports what it uses inside its function (see `registry`): importing this module
must stay cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, StateError, VCError
from .app import EXIT_TIMED_OUT, Globals
from .options import (
    COMMAND,
    CONFIG,
    CPUS,
    GUEST,
    MEMORY,
    SANDBOX_ID,
    TIMEOUT,
    WHICH_CONTAINER,
    config_request,
    guest_command,
    parse_size_mib,
)
from .output import emit_json, line, run_async, say, table, with_spinner
from .registry import Arg, command, group

if TYPE_CHECKING:
    from ..agent import ExecResult
    from ..sandbox import Sandbox

group("disk", "Hot-add and remove disks.")
group("assets", "Guest kernel and initrd.")
group("config", "Effective configuration.")

NAME = Arg("--name", help="Sandbox id.")
JSON = Arg("--json", dest="json_output", action="store_true", help="Machine-readable output.")
STDIN = Arg("--stdin", "-i", action="store_true", help="Send our stdin.")
NETWORK = (
    Arg(
        "--net",
        help="Network: none (loopback only), bridge[:NAME] (NAT, -p), ns:PATH (join a "
        "namespace), user (QEMU user-mode, no root). Default: bridge with -p or for run "
        "--image on QEMU (user when not root), else no NIC.",
    ),
    Arg(
        "--publish",
        "-p",
        action="append",
        default=[],
        help="Publish a port: [IP:]HOST_PORT:GUEST_PORT[/tcp|udp], an IPv6 IP in brackets "
        "(repeatable; without IP on IPv4 and IPv6).",
    ),
    Arg("--subnet", help="IPv4 subnet of the bridge (made on first use)."),
    Arg("--subnet6", help="IPv6 subnet of the bridge (default: a ULA /64), or none."),
)

CONTAINER = (
    Arg("--image", help="Run this image (virtc image ls) as a container."),
    Arg("--bundle", help="Run this OCI runtime bundle as a container."),
    Arg(
        "--volume",
        "-v",
        action="append",
        default=[],
        help="Share a host directory: HOST:GUEST[:ro] (repeatable).",
    ),
    Arg("--env", "-e", action="append", default=[], help="Container environment: K=V."),
    Arg("--workdir", "-w", help="Container working directory."),
    Arg("--user", "-u", help="Container user: UID[:GID] or a name."),
    Arg("--detach", "-d", action="store_true", help="Leave the container running; print the id."),
    Arg("--tty", "-t", action="store_true", help="Give the container a terminal."),
    Arg(
        "--userns",
        metavar="MODE",
        help="With --image: host (default: no user namespace), auto (container ids 0-65535 "
        "are ids 100000-165535 outside) or ID:SIZE (container ids 0..SIZE-1 are ID.. outside); "
        "the image's files are shifted to match, and what the container writes in -v "
        "directories belongs to the outside ids.",
    ),
)


def _new_sandbox(
    g: Globals, a: argparse.Namespace, default_net: str = "", **workload: Any
) -> Sandbox:
    """A Sandbox from the shared options; `workload`: image, bundle, mounts (see Sandbox);
    `default_net`: the network when no --net, -p or --subnet asks for one ("": no NIC)."""
    from ..sandbox import Sandbox

    config, overrides = config_request(g, a)
    network = None
    if a.net or a.publish or a.subnet or a.subnet6 or default_net:
        from ..network import NetworkConfig

        mode = a.net or ("bridge" if a.publish or a.subnet or a.subnet6 else default_net)
        network = NetworkConfig.parse(
            mode, a.publish, subnet=a.subnet or "", subnet6=a.subnet6 or ""
        )
    return Sandbox(
        a.name,
        g.hypervisor,
        config,
        run_root=g.run_root,
        start_timeout=a.timeout,
        network=network,
        **workload,
        **overrides,
    )


@command(
    "run",
    NAME,
    *GUEST,
    TIMEOUT,
    Arg("--exec-timeout", type=float, help="Command timeout in seconds."),
    STDIN,
    Arg("--from-template", metavar="NAME", help="Clone from this VM template."),
    Arg("--factory", action="store_true", help="Take a ready VM from the VM cache server."),
    *NETWORK,
    *CONTAINER,
    Arg(
        "command",
        nargs=argparse.REMAINDER,
        metavar="COMMAND...",
        help="Command to run (with --image: instead of the image's Cmd).",
    ),
)
def run(g: Globals, a: argparse.Namespace) -> int | None:
    """Boot a sandbox, run COMMAND in it (or in a container of --image/--bundle), print its
    output, tear down; exit with its code."""
    if a.from_template:
        _copy_template_memory(g, a.from_template)
    container = a.image is not None or a.bundle is not None
    if not container and (a.volume or a.env or a.workdir or a.user or a.detach or a.tty):
        raise ConfigError("-v, -e, -w, -u, -t and -d need --image or --bundle")
    if a.userns is not None and a.image is None:
        raise ConfigError("--userns needs --image (a bundle's config.json maps its own)")
    if a.userns not in (None, "host") and (a.from_template or a.factory):
        raise ConfigError("--userns cannot be used with --from-template or --factory")
    if container:
        from .container_cmds import run_container

        # Like `docker run`, an image gets a bridged network unless told otherwise (QEMU
        # user-mode networking without root, which a bridge needs).
        default = ""
        if a.image is not None and g.hypervisor == "qemu":
            default = "bridge" if os.geteuid() == 0 else "user"
        if a.from_template or a.factory:
            default = ""  # a NIC only when asked (--net): hot-adding one costs the fast start
        sb = _new_sandbox(
            g, a, default, image=a.image, bundle=a.bundle, mounts=a.volume, userns=a.userns
        )

        async def started() -> Sandbox:
            if a.from_template or a.factory:
                return await _from_factory(g, a, sb)
            await sb.start()
            return sb

        return run_container(g, a, started)
    data = sys.stdin.buffer.read() if a.stdin else b""
    if not [w for w in a.command if w != "--"]:
        raise ConfigError("run: no command given (or use --image/--bundle)")
    argv = guest_command(a)
    sb = _new_sandbox(g, a)

    async def body() -> ExecResult:
        if a.from_template or a.factory:
            async with await _from_factory(g, a, sb) as fsb:
                return await fsb.exec(argv, stdin=data, timeout=a.exec_timeout)
        async with sb:
            return await sb.exec(argv, stdin=data, timeout=a.exec_timeout)

    return print_result(g, with_spinner("booting sandbox", body, quiet=g.json))


def _copy_template_memory(g: Globals, name: str) -> None:
    """Start copying the template's memory for its clone now, while the modules the clone
    needs are imported (factory.memcopy): the copy is off the command's critical path."""
    from .. import persist
    from ..factory import memcopy, paths

    with contextlib.suppress(VCError):  # the clone reports what is wrong
        memcopy.copy_ahead(os.path.join(paths.templates_dir(g.run_root), persist.validate_id(name)))


async def _from_factory(g: Globals, a: argparse.Namespace, sb: Sandbox) -> Sandbox:
    """The sandbox `sb` describes, on a VM cloned from --from-template or taken from the VM
    cache (--factory), its network and its container's shares hot-added."""
    from ..factory import sandbox_from_factory
    from ..sandbox import build_config

    cfg = build_config(sb.config_request, sb.overrides, sb.hypervisor_type)
    return await sandbox_from_factory(
        cfg,
        template=a.from_template,
        use_cache=a.factory,
        run_root=g.run_root,
        id=a.name,
        timeout=a.timeout,
        image=sb.image,
        bundle=sb.bundle,
        mounts=sb.mounts,
        image_store=sb.image_store,
        network=sb.network_request,
    )


def print_result(g: Globals, result: ExecResult) -> int:
    """Print a guest command's output (or JSON); its exit code becomes ours."""
    if g.json:
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
        line("virtc: command timed out (killed in the guest)", err=True)
        return EXIT_TIMED_OUT
    if result.signal:
        return 128 + result.signal
    return result.exit_code


@command(
    "create",
    NAME,
    *GUEST,
    TIMEOUT,
    Arg("--start", action="store_true", help="Start it right away."),
    *NETWORK,
)
def create(g: Globals, a: argparse.Namespace) -> None:
    """Create a sandbox (and start it with --start); prints its id."""
    sb = _new_sandbox(g, a)

    async def body() -> None:
        await sb.create()
        if a.start:
            await sb.start()
            await sb.detach()

    with_spinner("booting sandbox" if a.start else "creating sandbox", body, quiet=g.json)
    say(g, {"id": sb.id, "state": sb.state.value}, sb.id)


async def attach(g: Globals, sandbox_id: str) -> Sandbox:
    from ..sandbox import Sandbox

    return await Sandbox.attach(sandbox_id, run_root=g.run_root)


@command("start", SANDBOX_ID)
def start(g: Globals, a: argparse.Namespace) -> None:
    """Start a created sandbox."""

    async def body() -> None:
        sb = await attach(g, a.sandbox_id)
        if sb.state.value != "created":
            raise StateError(f"sandbox {a.sandbox_id} is {sb.state.value}, not created")
        await sb.start()
        await sb.detach()

    with_spinner("booting sandbox", body, quiet=g.json)
    say(g, {"id": a.sandbox_id, "state": "running"}, a.sandbox_id)


@command(
    "stop",
    SANDBOX_ID,
    Arg("--force", "-f", action="store_true", help="Kill instead of shutdown."),
    Arg("--timeout", type=float, default=30.0, help="Seconds to wait."),
)
def stop(g: Globals, a: argparse.Namespace) -> None:
    """Stop a sandbox and remove it."""
    import asyncio

    async def body() -> None:
        sb = await attach(g, a.sandbox_id)
        await asyncio.wait_for(sb.stop(force=a.force), a.timeout)

    run_async(body())
    say(g, {"id": a.sandbox_id, "state": "stopped"}, a.sandbox_id)


@command("kill", SANDBOX_ID)
def kill(g: Globals, a: argparse.Namespace) -> None:
    """Kill a sandbox's VM at once (SIGKILL) and remove it."""

    async def body() -> None:
        sb = await attach(g, a.sandbox_id)
        await sb.stop(force=True)

    run_async(body())
    say(g, {"id": a.sandbox_id, "state": "stopped"}, a.sandbox_id)


def _act(g: Globals, sandbox_id: str, action: str, new_state: str) -> None:
    """Attach, call `Sandbox.<action>()`, let go; report the new state."""

    async def body() -> None:
        sb = await attach(g, sandbox_id)
        try:
            await getattr(sb, action)()
        finally:
            await sb.detach()

    run_async(body())
    say(g, {"id": sandbox_id, "state": new_state}, sandbox_id)


@command("pause", SANDBOX_ID)
def pause(g: Globals, a: argparse.Namespace) -> None:
    """Pause a running sandbox."""
    _act(g, a.sandbox_id, "pause", "paused")


@command("resume", SANDBOX_ID)
def resume(g: Globals, a: argparse.Namespace) -> None:
    """Resume a paused sandbox."""
    _act(g, a.sandbox_id, "resume", "running")


@command("list", Arg("--quiet", "-q", action="store_true", help="Only ids."), JSON)
def list_(g: Globals, a: argparse.Namespace) -> None:
    """List sandboxes."""
    from ..inventory import list_sandboxes

    infos = list_sandboxes(g.run_root)
    if a.json_output or g.json:
        emit_json([i.to_dict() for i in infos])
        return
    if a.quiet:
        for i in infos:
            line(i.id)
        return
    table(
        ("ID", "HYPERVISOR", "STATE", "PID", "VCPUS", "MEMORY", "IP", "CREATED"),
        [
            (
                i.id,
                i.hypervisor,
                i.state,
                i.pid,
                i.vcpus,
                f"{i.memory_mb} MiB",
                i.ip or "-",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_at)),
            )
            for i in infos
        ],
    )


@command("inspect", SANDBOX_ID)
def inspect(g: Globals, a: argparse.Namespace) -> None:
    """Print everything known about a sandbox as JSON (its state checked as `list` does)."""
    from .. import persist
    from ..inventory import live_state

    store = persist.StateStore(persist.run_root(g.run_root))
    if not store.exists(a.sandbox_id):
        raise StateError(f"no such sandbox: {a.sandbox_id}")
    doc = store.read(a.sandbox_id)
    state = live_state(store, a.sandbox_id, doc)
    if isinstance(doc.get("sandbox"), dict) and state != "unknown":
        doc["sandbox"]["state"] = state
    hv = doc.get("hypervisor")
    if isinstance(hv, dict) and hv.get("vm_state") in ("running", "paused"):
        hv["vm_state"] = state
    record = doc.get("sandbox", {}).get("network")
    if record:
        from ..network import SandboxNetwork

        # Addresses and published ports first; the full record stays under "sandbox".
        doc = {"network": SandboxNetwork.from_dict(record).summary(), **doc}
    emit_json(doc)


@command(
    "exec",
    Arg("--timeout", dest="exec_timeout", type=float, help="Command timeout in seconds."),
    STDIN,
    Arg("--env", "-e", action="append", default=[], help="KEY=VALUE (repeatable)."),
    Arg("--cwd", "-w", help="Working directory."),
    Arg("--user", "-u", help="In a container: UID[:GID] or a name."),
    WHICH_CONTAINER,
    SANDBOX_ID,
    COMMAND,
)
def exec_(g: Globals, a: argparse.Namespace) -> int:
    """Run a command in a running sandbox (inside its container when it has one)."""
    argv = guest_command(a)
    env: dict[str, str] = {}
    for item in a.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env: expected KEY=VALUE, got {item!r}")
        env[key] = value
    data = sys.stdin.buffer.read() if a.stdin else b""

    async def body() -> ExecResult:
        sb = await attach(g, a.sandbox_id)
        try:
            if sb.containers:
                from .container_cmds import exec_in_container

                return await exec_in_container(
                    sb, a.container, argv, a.env, a.cwd, a.user, data, a.exec_timeout
                )
            if a.user or a.container:
                raise ConfigError(
                    f"exec: --{'user' if a.user else 'container'} needs a sandbox with a container"
                )
            return await sb.exec(
                argv, stdin=data, env=env or None, cwd=a.cwd, timeout=a.exec_timeout
            )
        finally:
            await sb.detach()

    return print_result(g, run_async(body()))


@command(
    "logs",
    SANDBOX_ID,
    WHICH_CONTAINER,
    Arg("--console", action="store_true", help="The guest console log instead."),
    Arg("--vmm", action="store_true", help="The VMM's own log instead."),
    Arg("--follow", "-f", action="store_true", help="Keep printing new output until it stops."),
    Arg("--tail", "-n", type=int, help="Only the last N lines (then, with -f, new ones)."),
    Arg("--raw", action="store_true", help="Write control characters to a terminal as they are."),
)
def logs(g: Globals, a: argparse.Namespace) -> None:
    """Print a detached container's output (stdout and stderr as kept by the guest), or the
    guest console log (--console) or the VMM log (--vmm).

    With --follow: then what it writes, until it exits (Ctrl-C stops following, not it)."""
    if a.tail is not None and a.tail < 0:
        raise ConfigError(f"--tail: expected a number >= 0, got {a.tail}")
    if a.console and a.vmm:
        raise ConfigError("logs: --console and --vmm: give one")
    if a.container is not None and (a.console or a.vmm):
        raise ConfigError("logs: --container is for a container's output, not --console/--vmm")
    if not (a.console or a.vmm):
        from .container_cmds import container_logs

        with contextlib.suppress(KeyboardInterrupt):  # the way to end --follow
            container_logs(g, a)
        return
    from ..inventory import one_sandbox
    from ..sandbox import Sandbox
    from .logs import show_logs

    root = g.run_root
    Sandbox.log_paths_of(a.sandbox_id, root, vmm=a.vmm)  # no such sandbox: say so first

    def paths() -> list[str]:
        try:
            return Sandbox.log_paths_of(a.sandbox_id, root, vmm=a.vmm)
        except StateError:
            return []  # stopped meanwhile: its files went with it

    def running() -> bool:
        try:
            return one_sandbox(a.sandbox_id, root).state not in ("dead", "stopped")
        except StateError:
            return False

    def write(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        if a.follow:
            sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):  # the way to end --follow
        show_logs(
            paths,
            write,
            tail=a.tail,
            terminal=sys.stdout.isatty() and not a.raw,
            follow_while=running if a.follow else None,
        )
    sys.stdout.flush()


@command(
    "console",
    SANDBOX_ID,
    Arg("--escape", default="]", help="Escape key: Ctrl-<key> (default: ])."),
)
def console(g: Globals, a: argparse.Namespace) -> None:
    """Attach the terminal to the guest's serial console (Ctrl-] to leave)."""
    from .console import attach_console

    if len(a.escape) != 1:
        raise ConfigError(f"--escape: expected one character, got {a.escape!r}")

    async def body() -> tuple[str, list[str]]:
        sb = await attach(g, a.sandbox_id)
        try:
            return await sb.console_path(), sb.log_paths()
        finally:
            await sb.detach()

    path, log_files = run_async(body())
    attach_console(path, a.escape, history=log_files[-1] if log_files else None)  # the newest


@command(
    "disk add",
    SANDBOX_ID,
    Arg("path", help="Host file to attach."),
    Arg("--id", dest="disk_id", help="Device id."),
    Arg("--read-only", action="store_true", help="Attach read-only."),
)
def disk_add(g: Globals, a: argparse.Namespace) -> None:
    """Hot-add a host file as a disk."""
    if not os.path.exists(a.path):
        raise ConfigError(f"disk add: no such file {a.path}")

    async def body() -> Any:
        sb = await attach(g, a.sandbox_id)
        try:
            return await sb.add_disk(os.path.abspath(a.path), a.disk_id, read_only=a.read_only)
        finally:
            await sb.detach()

    drive = run_async(body())
    say(g, {"id": drive.id, "path": drive.path, "pci_path": drive.pci_path}, drive.id)


@command("disk rm", SANDBOX_ID, Arg("disk_id", help="Device id given by `disk add`."))
def disk_rm(g: Globals, a: argparse.Namespace) -> None:
    """Hot-remove a disk."""

    async def body() -> None:
        sb = await attach(g, a.sandbox_id)
        try:
            await sb.remove_disk_by_id(a.disk_id)
        finally:
            await sb.detach()

    run_async(body())
    say(g, {"id": a.disk_id, "removed": True}, a.disk_id)


@command("resize", SANDBOX_ID, CPUS, MEMORY)
def resize(g: Globals, a: argparse.Namespace) -> None:
    """Change vCPUs and/or memory of a running sandbox."""
    if a.cpus is None and a.memory is None:
        raise ConfigError("resize: give --cpus and/or --memory")
    mem = parse_size_mib(a.memory) if a.memory is not None else None

    async def body() -> None:
        sb = await attach(g, a.sandbox_id)
        try:
            await sb.resize(vcpus=a.cpus, memory_mb=mem)
        finally:
            await sb.detach()

    run_async(body())
    say(g, {"id": a.sandbox_id, "cpus": a.cpus, "memory_mb": mem}, a.sandbox_id)


@command("check", JSON)
def check(g: Globals, a: argparse.Namespace) -> None:
    """Report what this host can run: KVM or TCG, VMM binaries, vsock, run root."""
    from .. import host

    data = host.check().to_dict()
    if a.json_output or g.json:
        emit_json(data)
        return
    table(
        ("ITEM", "OK", "DETAIL"),
        [
            (item.get("name"), "yes" if item.get("ok") else "no", item.get("detail", ""))
            for item in data.get("items", [])
        ],
        title="virtc check",
    )


@command("capabilities", Arg("--markdown", action="store_true", help="As a Markdown table."))
def capabilities(g: Globals, a: argparse.Namespace) -> None:
    """What each hypervisor (and QEMU machine type) supports."""
    from .captable import COLUMNS, capability_rows, markdown_table

    if a.markdown:
        sys.stdout.write(markdown_table())
        return
    rows = capability_rows()
    if g.json:
        emit_json({label: caps.names() for label, caps in rows})
        return
    table(
        ("HYPERVISOR", *((c.name or "").lower().replace("_", " ") for c in COLUMNS)),
        [(label, *("yes" if c in caps else "-" for c in COLUMNS)) for label, caps in rows],
    )


@command("assets build", Arg("--force", action="store_true", help="Rebuild even if cached."))
def assets_build(g: Globals, a: argparse.Namespace) -> None:
    """Build (or reuse) the guest kernel and initrd."""
    from .. import guest

    assets = guest.build_assets(force=a.force)
    line(f"kernel {assets.kernel_version}: {assets.kernel}", err=True)
    line(f"initrd: {assets.initrd}", err=True)


@command("assets show")
def assets_show(g: Globals, a: argparse.Namespace) -> None:
    """Show the cached guest assets."""
    from .. import guest

    emit_json(guest.asset_info())


@command(
    "assets prune",
    Arg("--dry-run", action="store_true", help="Only list what would be removed."),
)
def assets_prune(g: Globals, a: argparse.Namespace) -> None:
    """Remove cached guest assets that the current inputs no longer use."""
    from .. import guest

    stale = guest.prune_assets(dry_run=a.dry_run)
    if g.json:
        emit_json(
            {"dry_run": a.dry_run, "stale": [{"name": e.name, "size": e.size} for e in stale]}
        )
        return
    verb = "would remove" if a.dry_run else "removed"
    for e in stale:
        line(f"{verb} {e.path} ({e.size / 2**20:.1f} MiB)")
    total = sum(e.size for e in stale) / 2**20
    line(f"{verb} {len(stale)} stale entries, {total:.1f} MiB", err=True)


@command("config show", CONFIG)
def config_show(g: Globals, a: argparse.Namespace) -> None:
    """Print the effective configuration (defaults filled in) as JSON."""
    from ..sandbox import build_config
    from ..types import HypervisorType
    from .options import load_config

    cfg = build_config(load_config(a.config, g.hypervisor), {}, HypervisorType.parse(g.hypervisor))
    emit_json(cfg.to_dict())
