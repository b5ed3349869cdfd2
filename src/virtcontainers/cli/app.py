"""`virtc`: the entry point, global options, dispatch to a registered command, error handling.

Start-up cost is part of the interface (`virtc list` in a loop, a shim per container): this
module imports the standard library only; `--version` is answered before anything else is
imported, and only the command being run builds its parser and imports what it uses (see
`registry`).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: `virtc --version` does without typing
if TYPE_CHECKING:
    import argparse

    from .registry import Registry

# Exit codes: distinct for usage errors, VM/infrastructure failures and command failures.
EXIT_USAGE = 2
EXIT_VM_FAILURE = 125
EXIT_UNSUPPORTED = EXIT_USAGE  # asked for what this hypervisor cannot do
EXIT_TIMED_OUT = 124  # as timeout(1)
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer killed by it

DESCRIPTION = (
    "Run lightweight virtual machines (sandboxes) on QEMU, Firecracker, Cloud Hypervisor, "
    "ACRN or a mock."
)
COMMAND_MODULES = ("commands", "container_cmds", "factory_cmds", "image_cmds")
"""Modules under `virtcontainers.cli` that register commands when imported (cheaply)."""
_VALUE_OPTIONS = ("-H", "--hypervisor", "--run-root")
"""Global options that take a value (the next word, unless given as `--opt=value`)."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP stopped the command after its clean-up (as KeyboardInterrupt does
    for SIGINT); a BaseException so that no `except Exception` takes it for a failure."""

    def __init__(self, signo: int) -> None:
        super().__init__(signo)
        self.signo = signo


class Globals:
    """Options given before the command."""

    def __init__(
        self,
        hypervisor: str = "qemu",
        run_root: str | None = None,
        debug: bool = False,
        json: bool = False,
    ) -> None:
        self.hypervisor = hypervisor
        self.run_root = run_root
        self.debug = debug
        self.json = json


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `virtc` script: run it and exit with its code."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


def run(argv: list[str]) -> int:
    """Run `virtc ARGV...`; errors become one readable line on stderr and an exit code."""
    head, rest = split_globals(argv)
    if "--version" in head:
        from .. import __version__

        sys.stdout.write(f"virtc {__version__}\n")
        return 0
    debug = "--debug" in head
    try:
        return _dispatch(head, rest)
    except SystemExit as e:  # argparse: usage errors (2) and --help (0)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("virtc: interrupted\n")
        return EXIT_INTERRUPTED
    except Terminated as e:
        import signal

        try:
            sys.stderr.write(f"virtc: terminated by {signal.Signals(e.signo).name}\n")
            sys.stderr.flush()
        except OSError:  # after SIGHUP our terminal may be gone
            pass
        return 128 + e.signo
    except BrokenPipeError:  # the reader went away (`virtc list | head -1`): as cat(1) does
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as e:
        return report_error(e, debug)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def split_globals(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the global options, the command and its arguments): globals come before the command."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") or word in ("-", "--"):
            break
        i += 2 if word in _VALUE_OPTIONS else 1
    return argv[:i], argv[i:]


def _dispatch(head: list[str], rest: list[str]) -> int:
    root = _root_parser()
    opts = root.parse_args(head)
    g = Globals(opts.hypervisor, opts.run_root, opts.debug, opts.json)
    registry = load_registry()
    if opts.help or not rest:
        out = sys.stdout if opts.help else sys.stderr
        out.write(root.format_help() + _command_list(registry, None))
        return 0 if opts.help else EXIT_USAGE
    from ..types import HypervisorType

    HypervisorType.parse(g.hypervisor)
    name = rest[0]
    if name in registry.groups:
        sub = rest[1:2]
        if not sub or sub[0] in ("-h", "--help"):
            out = sys.stdout if sub else sys.stderr
            out.write(
                f"usage: virtc {name} COMMAND [ARGS]...\n\n{registry.groups[name]}\n"
                + _command_list(registry, name)
            )
            return 0 if sub else EXIT_USAGE
        name, args = f"{name} {sub[0]}", rest[2:]
    else:
        args = rest[1:]
    cmd = registry.commands.get(name)
    if cmd is None:
        root.error(f"No such command '{name}'.")
    code = cmd.func(g, cmd.parser().parse_args(args))
    return code or 0


def _root_parser() -> argparse.ArgumentParser:
    import argparse

    from .helpformat import HelpFormatter

    p = argparse.ArgumentParser(
        prog="virtc",
        formatter_class=HelpFormatter,
        usage="virtc [OPTIONS] COMMAND [ARGS]...",
        description=DESCRIPTION,
        add_help=False,
    )
    p.add_argument(
        "-H",
        "--hypervisor",
        default="qemu",
        metavar="NAME",
        help="qemu, firecracker, clh, acrn or mock (default: qemu).",
    )
    p.add_argument(
        "--run-root",
        metavar="DIR",
        help="Where VM directories and state live (default: $VC_RUN_ROOT, /run/vc as root).",
    )
    p.add_argument("--debug", action="store_true", help="Show error details and logs.")
    p.add_argument("--json", action="store_true", help="Machine-readable output.")
    p.add_argument("--version", action="store_true", help="Print the version.")
    p.add_argument("-h", "--help", action="store_true", help="Show this help.")
    return p


def load_registry() -> Registry:
    """The registry, filled by importing the command modules."""
    import importlib

    from .registry import REGISTRY

    for module in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return REGISTRY


def _command_list(registry: Registry, group: str | None) -> str:
    entries = registry.subcommands(group)
    width = max(map(len, entries), default=0) + 2
    lines = [f"  {name:<{width}}{summary}" for name, summary in entries.items()]
    where = f"virtc {group} COMMAND" if group else "virtc COMMAND"
    return "\ncommands:\n" + "\n".join(lines) + f"\n\nRun '{where} --help' for its options.\n"


def report_error(e: BaseException, debug: bool) -> int:
    """Print one readable line (the detail with --debug) and return the exit code.

    Messages may carry guest text (an agent's error, a console tail): their control
    characters are shown visibly, never sent to the terminal.
    """
    from ..errors import ConfigError, ImageError, UnsupportedError, VCError
    from .logs import terminal_safe

    if debug:
        import traceback

        sys.stderr.write(terminal_safe("".join(traceback.format_exception(e))))
    message = terminal_safe(str(e).strip() or type(e).__name__)
    first, _, rest = message.partition("\n")
    sys.stderr.write(f"virtc: error: {first}\n")
    if rest and debug:
        sys.stderr.write(rest + "\n")
    elif rest:
        sys.stderr.write("(run with --debug for details)\n")
    if isinstance(e, ConfigError):
        return EXIT_USAGE
    if isinstance(e, UnsupportedError):
        return EXIT_UNSUPPORTED
    if isinstance(e, ImageError):
        return 1  # a bad image or reference: the command failed, not a VM
    if isinstance(e, VCError):
        return EXIT_VM_FAILURE
    return 1
