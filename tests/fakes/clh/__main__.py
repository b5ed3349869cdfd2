"""Entry point: `python -m tests.fakes.clh --api-socket path=PATH`."""

from __future__ import annotations

import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
