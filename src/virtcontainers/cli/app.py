"""`virtc`: the root command, global options and error handling."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..errors import ConfigError, VCError

# Exit codes: distinct for usage errors, VM/infrastructure failures and command failures.
EXIT_USAGE = 2
EXIT_VM_FAILURE = 125
EXIT_UNSUPPORTED = EXIT_USAGE  # asked for what this hypervisor cannot do
EXIT_TIMED_OUT = 124  # as timeout(1)

app = typer.Typer(
    name="virtc",
    help="Run lightweight virtual machines (sandboxes) on QEMU, Firecracker, "
    "Cloud Hypervisor, ACRN or a mock.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


@dataclass
class Globals:
    """Options given before the subcommand."""

    hypervisor: str = "qemu"
    run_root: str | None = None
    debug: bool = False
    json: bool = False


def get_globals(ctx: typer.Context) -> Globals:
    """The global options of this invocation."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Globals) else Globals()


def emit_json(data: Any) -> None:
    """Print JSON to stdout (machine-readable output)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        out.print(f"virtc {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    hypervisor: Annotated[
        str, typer.Option("--hypervisor", "-H", help="qemu, firecracker, clh, acrn or mock.")
    ] = "qemu",
    run_root: Annotated[
        str | None,
        typer.Option(
            "--run-root", help="Where VM directories and state live.", envvar="VC_RUN_ROOT"
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show error details and logs.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Global options."""
    from ..types import HypervisorType

    HypervisorType.parse(hypervisor)
    ctx.obj = Globals(hypervisor=hypervisor, run_root=run_root, debug=debug, json=json_output)


@app.command()
def check(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Report what this host can run: KVM or TCG, VMM binaries, vsock, run root."""
    from .. import host

    g = get_globals(ctx)
    report = host.check()
    data = report.to_dict()
    if json_output or g.json:
        emit_json(data)
        return
    table = Table(title="virtc check", show_lines=False)
    table.add_column("item")
    table.add_column("ok")
    table.add_column("detail")
    for item in data.get("items", []):
        mark = "[green]yes[/]" if item.get("ok") else "[yellow]no[/]"
        table.add_row(str(item.get("name")), mark, str(item.get("detail", "")))
    out.print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn errors into one readable line and an exit code."""
    from . import commands, container_cmds  # noqa: F401  (register subcommands)
    from .factory_cmds import factory_app, template_app
    from .image_cmds import image_app

    if not any(g.name == "template" for g in app.registered_groups):
        app.add_typer(template_app, name="template")
        app.add_typer(factory_app, name="factory")
        app.add_typer(image_app, name="image")

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # Standalone mode: the parser reports usage errors itself (exit code 2).
        app(args=argv)
    except KeyboardInterrupt:
        err.print("virtc: interrupted")
        sys.exit(130)
    except Exception as e:
        sys.exit(report_error(e, debug))


def report_error(e: BaseException, debug: bool) -> int:
    """Print one readable line (the detail with --debug) and return the exit code.

    Messages may carry guest text (an agent's error, a console tail): their control
    characters are shown visibly, never sent to the terminal.
    """
    from ..errors import ImageError, UnsupportedError
    from .logs import terminal_safe

    if debug:
        from rich.traceback import Traceback

        trace = Traceback.extract(type(e), e, e.__traceback__)
        for stack in trace.stacks:
            stack.exc_value = terminal_safe(stack.exc_value)
        err.print(Traceback(trace))
    message = terminal_safe(str(e).strip() or type(e).__name__)
    first, _, rest = message.partition("\n")
    err.print(f"virtc: error: {first}", markup=False, highlight=False)
    if rest and debug:
        err.print(rest, markup=False, highlight=False)
    elif rest:
        err.print("(run with --debug for details)", markup=False, highlight=False)
    if isinstance(e, ConfigError):
        return EXIT_USAGE
    if isinstance(e, UnsupportedError):
        return EXIT_UNSUPPORTED
    if isinstance(e, ImageError):
        return 1  # a bad image or reference: the command failed, not a VM
    if isinstance(e, VCError):
        return EXIT_VM_FAILURE
    return 1
