"""The command registry: each `virtc` command, its arguments (as data) and its function.

A command module registers its commands at import with `@command(...)`; importing it must
stay cheap (the standard library and this package's light modules only): what a command
needs beyond that, it imports inside its function. The arguments are kept as `Arg` data and
turned into an argparse parser only for the command being run, so `virtc --help` and
`virtc list` pay neither for the other commands' parsers nor for their imports.
`tests/unit/test_cli_startup.py` checks which modules each command loads.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: see `app`
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any, TypeAlias

    from .app import Globals

    CommandFunc: TypeAlias = Callable[[Globals, argparse.Namespace], int | None]
    """A command: the global options and its parsed arguments -> exit code (None: 0)."""


class Arg:
    """One `ArgumentParser.add_argument(*flags, **kwargs)` call, kept until it is needed."""

    def __init__(self, *flags: str, **kwargs: Any) -> None:
        self.flags = flags
        self.kwargs = kwargs

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.flags, **self.kwargs)


class Command:
    """A registered command: `name` is its words after `virtc` ("exec", "disk add")."""

    def __init__(self, name: str, func: CommandFunc, args: tuple[Arg, ...], help: str) -> None:
        self.name = name
        self.func = func
        self.args = args
        self.help = help

    @property
    def summary(self) -> str:
        """The help's first paragraph on one line, for command lists."""
        return " ".join(self.help.split("\n\n", 1)[0].split())

    def parser(self) -> argparse.ArgumentParser:
        """The argparse parser of this command's arguments."""
        import argparse

        from .helpformat import HelpFormatter

        p = argparse.ArgumentParser(
            prog=f"virtc {self.name}", description=self.help, formatter_class=HelpFormatter
        )
        for arg in self.args:
            arg.add_to(p)
        return p


class Registry:
    """Commands and command groups ("disk", "template", ...) by name."""

    def __init__(self) -> None:
        self.commands: dict[str, Command] = {}
        self.groups: dict[str, str] = {}

    def add(self, cmd: Command) -> None:
        if cmd.name in self.commands:
            raise ValueError(f"virtc command {cmd.name!r} is registered twice")
        words = cmd.name.split()
        if len(words) > 1 and words[0] not in self.groups:
            raise ValueError(f"virtc command {cmd.name!r}: no command group {words[0]!r}")
        self.commands[cmd.name] = cmd

    def subcommands(self, group: str | None) -> dict[str, str]:
        """Name -> summary of the commands and groups directly under `group` (None: the top)."""
        out: dict[str, str] = {}
        if group is None:
            out.update(self.groups)
        prefix = f"{group} " if group else ""
        for name, cmd in self.commands.items():
            rest = name.removeprefix(prefix) if name.startswith(prefix) else None
            if rest and " " not in rest and (group is not None or name not in self.groups):
                out[rest] = cmd.summary
        return dict(sorted(out.items()))


REGISTRY = Registry()


def group(name: str, help: str) -> None:
    """Declare a command group (`virtc NAME SUBCOMMAND ...`)."""
    REGISTRY.groups[name] = help


def command(name: str, *args: Arg) -> Callable[[CommandFunc], CommandFunc]:
    """Register the decorated function as `virtc NAME`; its docstring is the help text."""

    def register(func: CommandFunc) -> CommandFunc:
        REGISTRY.add(Command(name, func, args, _clean_doc(func.__doc__ or "")))
        return func

    return register


def _clean_doc(doc: str) -> str:
    """A docstring without the indentation of its continuation lines."""
    import textwrap

    first, _, rest = doc.strip().partition("\n")
    return f"{first}\n{textwrap.dedent(rest)}".strip()
