"""`virtc logs`: print, tail and follow a sandbox's log files, terminal-safe by default.

The console log holds whatever the guest wrote to its serial port. Written raw to a
terminal, a guest could drive it with escape sequences (retitle it, query it so the reply
lands on the user's input, write the clipboard with OSC 52): on a terminal, control
characters are shown as `^X` instead.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

FOLLOW_INTERVAL = 0.2
"""Seconds between looks at the files (and at whether the sandbox still runs)."""
_CHUNK = 65536


class TerminalFilter:
    """Make guest output safe to show on a terminal, across arbitrary chunk boundaries.

    Serial consoles end lines with CR LF: that becomes LF. Every other C0 control but tab
    and LF, DEL, and the C1 controls (8-bit escape sequence introducers) are shown
    visibly; invalid UTF-8 becomes U+FFFD.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._cr = False

    def feed(self, data: bytes) -> bytes:
        return self._clean(self._decoder.decode(data), final=False)

    def flush(self) -> bytes:
        return self._clean(self._decoder.decode(b"", final=True), final=True)

    def _clean(self, text: str, final: bool) -> bytes:
        if self._cr:
            text = "\r" + text
            self._cr = False
        if text.endswith("\r") and not final:
            text, self._cr = text[:-1], True  # a CR LF may be split across chunks
        out = []
        for ch in text.replace("\r\n", "\n"):
            code = ord(ch)
            if ch in "\n\t" or (0x20 <= code < 0x7F) or code > 0x9F:
                out.append(ch)
            elif code < 0x20:
                out.append("^" + chr(code + 0x40))
            elif code == 0x7F:
                out.append("^?")
            else:
                out.append(f"\\x{code:02x}")
        return "".join(out).encode("utf-8")


def terminal_safe(text: str) -> str:
    """`text` (guest-made: an agent's error, a console tail) with its control characters shown
    visibly, as `TerminalFilter` does, for printing to the operator's terminal."""
    f = TerminalFilter()
    return (f.feed(text.encode("utf-8", "surrogateescape")) + f.flush()).decode("utf-8")


def tail_start(f: BinaryIO, lines: int) -> tuple[int, int]:
    """Where the last `lines` lines of `f` begin (a final partial line counts), and how
    many lines that is (fewer when the file has fewer)."""
    end = f.seek(0, os.SEEK_END)
    if lines <= 0 or end == 0:
        return end, 0
    pos, buf = end, b""
    # One newline more than wanted marks where the first wanted line starts.
    while pos > 0 and buf.count(b"\n") <= lines:
        step = min(_CHUNK, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
    body = buf[:-1] if buf.endswith(b"\n") else buf
    cut = len(body)
    for found in range(lines):
        cut = body.rfind(b"\n", 0, cut)
        if cut < 0:
            return pos, found + 1
    return pos + cut + 1, lines


class LogReader:
    """Reads the new part of each log file on every call, from where the last call ended.

    Offsets are kept by file identity, not by name: a log rotated to `X.1` since the last
    call goes on from where it was, and the new `X` is read from its start.
    """

    def __init__(self, write: Callable[[bytes], None], tail: int | None, terminal: bool) -> None:
        self._write = write
        self._tail = tail
        self._terminal = terminal
        self._offsets: dict[tuple[int, int], int] = {}
        self._filter = TerminalFilter()
        self._started = False

    def read(self, paths: Sequence[str]) -> None:
        """Write what `paths` (oldest first) gained since the last call (the first call:
        everything, or the last `tail` lines of them all)."""
        if not self._started:
            self._started = True
            if self._tail is not None:
                self._skip_to_tail(paths, self._tail)
        for path in paths:
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                self._read_one(f)

    def _skip_to_tail(self, paths: Sequence[str], lines: int) -> None:
        for path in reversed(paths):
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                offset, got = tail_start(f, lines)
                lines -= got
                st = os.fstat(f.fileno())
                self._offsets[(st.st_dev, st.st_ino)] = offset

    def _read_one(self, f: BinaryIO) -> None:
        st = os.fstat(f.fileno())
        ident = (st.st_dev, st.st_ino)
        start = self._offsets.get(ident, 0)
        if start > st.st_size:
            start = 0  # truncated: what it holds now is all new
        f.seek(start)
        while data := f.read(_CHUNK):
            start += len(data)
            self._emit(data)
        self._offsets[ident] = start

    def close(self) -> None:
        if self._terminal and (out := self._filter.flush()):
            self._write(out)

    def _emit(self, data: bytes) -> None:
        if not self._terminal:
            self._write(data)
        elif out := self._filter.feed(data):
            self._write(out)


def show_logs(
    paths: Callable[[], Sequence[str]],
    write: Callable[[bytes], None],
    *,
    tail: int | None = None,
    terminal: bool = False,
    follow_while: Callable[[], bool] | None = None,
) -> None:
    """Write the logs `paths()` names; with `follow_while`, keep writing what is appended
    (and files that appear) for as long as it returns True, then what came last."""
    reader = LogReader(write, tail, terminal)
    try:
        reader.read(paths())
        if follow_while is not None:
            while follow_while():
                time.sleep(FOLLOW_INTERVAL)
                reader.read(paths())
            reader.read(paths())
    finally:
        reader.close()
