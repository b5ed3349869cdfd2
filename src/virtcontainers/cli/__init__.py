"""The `virtc` command-line tool.

Start-up cost is part of its interface: `virtc list` runs in loops and scripts. The entry
point (`main`) hands the command to the zygote when the VM cache server runs one (a worker
with everything imported runs it: `virtcontainers.zygote`), else runs it here: `app.main`
imports the standard library only, answers `--version` at once, and builds the parser of the
one command being run; commands import what they use inside their function. To add a
command, register it in a module listed in `app.COMMAND_MODULES`:

    @command("ps", SANDBOX_ID, Arg("--all", "-a", action="store_true", help="..."))
    def ps(g: Globals, a: argparse.Namespace) -> int | None:
        \"\"\"One line for `virtc --help`; more lines for `virtc ps --help`.\"\"\"
        from ..sandbox import Sandbox  # heavy imports here, never at the top
        ...

`tests/unit/test_cli_startup.py` fails when a command loads modules it should not.
"""

from __future__ import annotations

import sys

from . import app
from .app import run

__all__ = ["main", "run"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `virtc` script: run it (in a zygote's worker when one takes it)
    and exit with its code."""
    if argv is None:
        from ..zygote.client import delegate, virtc_sockets

        args = sys.argv[1:]
        code = delegate("virtc", [sys.argv[0], *args], virtc_sockets(args))
        if code is not None:
            sys.exit(code)
    app.main(argv)
