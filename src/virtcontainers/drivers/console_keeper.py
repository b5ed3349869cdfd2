"""The process that keeps a VMM's console log within a size cap (run as a script).

`python -I -S console_keeper.py PATH MAX_BYTES` copies its stdin (a pipe the VMM writes the
console into) to PATH; once PATH holds MAX_BYTES it becomes PATH.1 (replacing the previous
one) and a new PATH starts, so at most twice the cap is on disk. Every chunk is written as
soon as it is read (the log is live). A write that fails (a full disk) drops that chunk
and reading goes on, so the VMM never waits for the log. Exits when the pipe's last writer
closes it (the VMM exited). Standard library only: it runs without the package's
dependencies, in a small interpreter.
"""

from __future__ import annotations

import contextlib
import os
import sys

CHUNK = 65536
ROTATED_SUFFIX = ".1"


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def keep(src: int, path: str, max_bytes: int) -> None:
    """Copy `src` to `path` until end of file, rotating at `max_bytes`."""
    out = _open(path)
    size = 0
    try:
        while data := os.read(src, CHUNK):
            while data:
                if size >= max_bytes:
                    os.close(out)
                    out = -1
                    os.replace(path, path + ROTATED_SUFFIX)
                    out = _open(path)
                    size = 0
                part, data = data[: max_bytes - size], data[max_bytes - size :]
                with contextlib.suppress(OSError):  # dropped: the VMM must not wait for its log
                    _write_all(out, part)
                size += len(part)
    finally:
        if out >= 0:
            os.close(out)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit() or int(argv[2]) <= 0:
        print("usage: console_keeper.py PATH MAX_BYTES (MAX_BYTES > 0)", file=sys.stderr)
        return 2
    try:
        keep(0, argv[1], int(argv[2]))
    except OSError as e:
        print(f"console keeper: {argv[1]}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
