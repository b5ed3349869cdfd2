"""Containers from the command line: `virtc run --image/--bundle`, `virtc exec` into a
container, `virtc ps`, `virtc cp`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from .app import app, emit_json, get_globals, out

if TYPE_CHECKING:
    from ..agent import ExecResult
    from ..sandbox import Sandbox


def run_container(
    ctx: typer.Context,
    sb: Sandbox,
    command: list[str] | None,
    env: list[str] | None,
    workdir: str | None,
    user: str | None,
    data: bytes,
    exec_timeout: float | None,
    detach: bool,
) -> None:
    """`virtc run --image|--bundle`: boot, create the container, run it; exit with its code
    (or, with `detach`, leave it running and print the sandbox id)."""
    from .commands import _print_result, with_spinner

    if command and command[0] == "--":
        command = command[1:]

    async def body() -> ExecResult | None:
        await sb.start()
        try:
            container = await sb.create_container(
                command or None, env=env or [], cwd=workdir, user=user
            )
            if detach:
                await container.start_detached()
                sb._persist()
                await sb.detach()
                return None
            result: ExecResult = await container.run(stdin=data, timeout=exec_timeout)
        except BaseException:
            await sb.stop()
            raise
        await sb.stop()
        return result

    result = with_spinner("booting sandbox", body, quiet=get_globals(ctx).json)
    if result is None:
        out.print(sb.id, markup=False, highlight=False)
        return
    _print_result(ctx, result)


async def exec_in_container(
    sb: Sandbox,
    command: list[str],
    env: list[str] | None,
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
    return await container.exec(
        command, env=env or [], cwd=cwd, user=ids, stdin=data, timeout=timeout
    )


IdArg = Annotated[str, typer.Argument(help="Sandbox id.", show_default=False)]


@app.command()
def ps(
    ctx: typer.Context,
    sandbox_id: IdArg,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The processes of a sandbox's container (guest pids)."""
    from .commands import _attach, run_async

    async def body() -> list[tuple[int, str]]:
        sb: Sandbox = await _attach(ctx, sandbox_id)
        try:
            return await sb.container().processes()
        finally:
            await sb.detach()

    procs = run_async(body())
    if json_output or get_globals(ctx).json:
        emit_json([{"pid": pid, "command": cmd} for pid, cmd in procs])
        return
    out.print("PID   COMMAND", markup=False, highlight=False)
    for pid, cmd in procs:
        out.print(f"{pid:<5} {cmd}", markup=False, highlight=False, soft_wrap=True)


def _split(arg: str) -> tuple[str | None, str]:
    """`ID:/path` -> (ID, /path); anything else is a host path."""
    head, sep, tail = arg.partition(":")
    if sep and tail.startswith("/") and head and "/" not in head:
        return head, tail
    return None, arg


@app.command()
def cp(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="Host path, or ID:/path in a container.")],
    dst: Annotated[str, typer.Argument(help="Host path, or ID:/path in a container.")],
) -> None:
    """Copy files or directories between the host and a sandbox's container."""
    from ..errors import ConfigError
    from .commands import _attach, run_async

    src_id, src_path = _split(src)
    dst_id, dst_path = _split(dst)
    if (src_id is None) == (dst_id is None):
        raise ConfigError("cp: exactly one of SRC and DST must be ID:/path")
    sandbox_id = src_id or dst_id
    assert sandbox_id is not None

    async def body() -> None:
        from .. import persist
        from ..containers.copy import copy_in, copy_out

        sb: Sandbox = await _attach(ctx, sandbox_id)
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
