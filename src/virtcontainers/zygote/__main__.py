"""`python -m virtcontainers.zygote --socket PATH [--parent-fd FD]`: import the library, then
serve on PATH until SIGTERM or until FD (a pipe from the VM cache server) reaches EOF."""

from __future__ import annotations

import argparse
import gc
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtcontainers.zygote")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--parent-fd", type=int)
    args = parser.parse_args(argv)
    log = logging.getLogger("virtcontainers.zygote")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    from .preload import preload
    from .server import serve

    preload()
    # What is imported now stays as it is: the collector never touches it again, so its
    # pages stay shared with every worker (a collection writes to each object it visits).
    gc.collect()
    gc.freeze()
    return serve(args.socket, args.parent_fd)


if __name__ == "__main__":
    sys.exit(main())
