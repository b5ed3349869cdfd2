"""`virtc logs`: print, tail and follow a sandbox's log files, terminal-safe by default.

The console log holds whatever the guest wrote to its serial port. Written raw to a
terminal, a guest could drive it with escape sequences (retitle it, query it so the reply
lands on the user's input, write the clipboard with OSC 52): on a terminal, control
characters are shown as `^X` instead.
"""

from __future__ import annotations

import codecs
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


def tail_start(f: BinaryIO, lines: int) -> int:
    """Offset where the last `lines` lines of `f` begin (a final partial line counts)."""
    end = f.seek(0, os.SEEK_END)
    if lines <= 0:
        return end
    pos, buf = end, b""
    # One newline more than wanted marks where the first wanted line starts.
    while pos > 0 and buf.count(b"\n") <= lines:
        step = min(_CHUNK, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
    body = buf[:-1] if buf.endswith(b"\n") else buf
    cut = -1
    for _ in range(lines):
        cut = body.rfind(b"\n", 0, cut if cut >= 0 else len(body))
        if cut < 0:
            return pos
    return pos + cut + 1


class LogReader:
    """Reads the new part of each log file on every call, from where the last call ended."""

    def __init__(self, write: Callable[[bytes], None], tail: int | None, terminal: bool) -> None:
        self._write = write
        self._tail = tail
        self._terminal = terminal
        self._offsets: dict[str, tuple[int, int]] = {}  # path -> (inode, offset)
        self._filters: dict[str, TerminalFilter] = {}

    def read(self, paths: Sequence[str]) -> None:
        for path in paths:
            try:
                with open(path, "rb") as f:
                    self._read_one(path, f)
            except FileNotFoundError:
                continue

    def _read_one(self, path: str, f: BinaryIO) -> None:
        st = os.fstat(f.fileno())
        known = self._offsets.get(path)
        if known is None:
            start = 0 if self._tail is None else tail_start(f, self._tail)
        elif known[0] != st.st_ino or known[1] > st.st_size:
            start = 0  # replaced or truncated: its new content is all new
        else:
            start = known[1]
        f.seek(start)
        while data := f.read(_CHUNK):
            start += len(data)
            self._emit(path, data)
        self._offsets[path] = (st.st_ino, start)

    def close(self) -> None:
        for path in self._filters:
            self._emit(path, b"", final=True)

    def _emit(self, path: str, data: bytes, final: bool = False) -> None:
        if not self._terminal:
            self._write(data)
            return
        filt = self._filters.setdefault(path, TerminalFilter())
        out = filt.flush() if final else filt.feed(data)
        if out:
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
