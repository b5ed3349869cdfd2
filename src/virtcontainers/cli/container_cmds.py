"""Containers from the command line: `virtc run --image/--bundle`, `virtc exec` into a
container, `virtc ps` (registered on import; the container code is imported inside)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .app import Globals
from .options import SANDBOX_ID, guest_command
from .output import emit_json, line, run_async, with_spinner
from .registry import Arg, command

if TYPE_CHECKING:
    from ..agent import ExecResult
    from ..sandbox import Sandbox


def run_container(g: Globals, a: argparse.Namespace, sb: Sandbox, data: bytes) -> int | None:
    """`virtc run --image|--bundle`: boot, create the container, run it; exit with its code
    (or, with `--detach`, leave it running and print the sandbox id)."""
    from .commands import print_result

    argv = guest_command(a) if [w for w in a.command if w != "--"] else None

    async def body() -> ExecResult | None:
        await sb.start()
        try:
            container = await sb.create_container(argv, env=a.env, cwd=a.workdir, user=a.user)
            if a.detach:
                await container.start_detached()
                sb._persist()
                await sb.detach()
                return None
            result: ExecResult = await container.run(stdin=data, timeout=a.exec_timeout)
        except BaseException:
            await sb.stop()
            raise
        await sb.stop()
        return result

    result = with_spinner("booting sandbox", body, quiet=g.json)
    if result is None:
        line(sb.id)
        return None
    return print_result(g, result)


async def exec_in_container(
    sb: Sandbox,
    argv: list[str],
    env: list[str],
    cwd: str | None,
    user: str | None,
    data: bytes,
    timeout: float | None,
) -> ExecResult:
    """`virtc exec ID -- CMD` in a sandbox that runs a container: inside the container."""
    from ..containers.spec import resolve_user

    container = sb.container()
    ids = None
    if user:
        uid, gid, _ = resolve_user(user, str(sb.workload.get("lower", "")))
        ids = (uid, gid)
    return await container.exec(argv, env=env, cwd=cwd, user=ids, stdin=data, timeout=timeout)


@command(
    "ps",
    SANDBOX_ID,
    Arg("--json", dest="json_output", action="store_true", help="Machine-readable output."),
)
def ps(g: Globals, a: argparse.Namespace) -> None:
    """The processes of a sandbox's container (guest pids)."""
    from .commands import attach

    async def body() -> list[tuple[int, str]]:
        sb = await attach(g, a.sandbox_id)
        try:
            return await sb.container().processes()
        finally:
            await sb.detach()

    procs = run_async(body())
    if a.json_output or g.json:
        emit_json([{"pid": pid, "command": cmd} for pid, cmd in procs])
        return
    line("PID   COMMAND")
    for pid, cmd in procs:
        line(f"{pid:<5} {cmd}")


def _split(arg: str) -> tuple[str | None, str]:
    """`ID:/path` -> (ID, /path); anything else is a host path."""
    head, sep, tail = arg.partition(":")
    if sep and tail.startswith("/") and head and "/" not in head:
        return head, tail
    return None, arg


@command(
    "cp",
    Arg("src", metavar="SRC", help="Host path, or ID:/path in a container."),
    Arg("dst", metavar="DST", help="Host path, or ID:/path in a container."),
)
def cp(g: Globals, a: argparse.Namespace) -> None:
    """Copy files or directories between the host and a sandbox's container."""
    from ..errors import ConfigError
    from .commands import attach

    src_id, src_path = _split(a.src)
    dst_id, dst_path = _split(a.dst)
    if (src_id is None) == (dst_id is None):
        raise ConfigError("cp: exactly one of SRC and DST must be ID:/path")
    sandbox_id = src_id or dst_id
    assert sandbox_id is not None

    async def body() -> None:
        from .. import persist
        from ..containers.copy import copy_in, copy_out

        sb = await attach(g, sandbox_id)
        try:
            container = sb.container()
            vm_dir = persist.vm_dir(sb.id, sb.run_root)
            if dst_id is not None:
                root, where, read_only = container.locate(dst_path, vm_dir)
                if read_only:
                    raise ConfigError(f"cp: {dst_path} is on a read-only volume")
                copy_in(root, src_path, where)  # forks: not from a worker thread
            else:
                root, where, _ = container.locate(src_path, vm_dir)
                copy_out(root, where, dst_path)
        finally:
            await sb.detach()

    run_async(body())
