"""`virtc logs` pieces: the terminal filter, tail offsets, and following files that change."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtcontainers.cli.logs import LogReader, TerminalFilter, show_logs, tail_start


def clean(*chunks: bytes) -> bytes:
    f = TerminalFilter()
    return b"".join(f.feed(c) for c in chunks) + f.flush()


def test_terminal_filter_shows_controls_visibly() -> None:
    assert clean(b"ok\r\n") == b"ok\n"
    assert clean(b"a\tb\n") == b"a\tb\n"
    assert clean(b"\x1b]0;pwned\x07x") == b"^[]0;pwned^Gx"  # retitling the terminal
    assert clean(b"\x1b]52;c;aGk=\x07") == b"^[]52;c;aGk=^G"  # writing the clipboard
    assert clean(b"\x1b[6n") == b"^[[6n"  # a query whose answer would land on stdin
    assert clean(b"del\x7f") == b"del^?"
    assert clean("\u009b31m".encode()) == b"\\x9b31m"  # C1 CSI
    assert clean(b"over\rwrite") == b"over^Mwrite"  # no overprinting a line
    assert clean(b"bad \xff byte") == "bad \ufffd byte".encode()
    assert clean("caf\u00e9 \u2713".encode()) == "caf\u00e9 \u2713".encode()


def test_terminal_filter_joins_what_chunks_split() -> None:
    assert clean(b"line\r", b"\nnext") == b"line\nnext"
    assert clean(b"end\r") == b"end^M"
    e_acute = "\u00e9".encode()
    assert clean(e_acute[:1], e_acute[1:]) == e_acute


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_terminal_filter_property(data: bytes, cuts: list[int]) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    out = clean(*chunks)
    assert out == clean(data)  # chunking never changes the result
    text = out.decode("utf-8")  # always valid UTF-8
    assert all(ch in "\n\t" or 0x20 <= ord(ch) < 0x7F or ord(ch) > 0x9F for ch in text)
    printable = bytes(b for b in data if 0x20 <= b < 0x7F or b in b"\n\t")
    if printable == data:
        assert out == data


@pytest.mark.parametrize(
    ("content", "lines", "expected"),
    [
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc", 2, b"b\nc"),  # a final partial line counts
        (b"a\nb\nc\n", 5, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 0, b""),
        (b"", 3, b""),
        (b"\n\n\n", 2, b"\n\n"),
    ],
)
def test_tail_start(tmp_path: Path, content: bytes, lines: int, expected: bytes) -> None:
    path = tmp_path / "log"
    path.write_bytes(content)
    with open(path, "rb") as f:
        offset, found = tail_start(f, lines)
        f.seek(offset)
        assert f.read() == expected
    assert found == len(expected.splitlines())


def test_tail_start_beyond_one_chunk(tmp_path: Path) -> None:
    path = tmp_path / "log"
    rows = [f"{i:06d} {'x' * 90}\n".encode() for i in range(5000)]  # ~480 KiB
    path.write_bytes(b"".join(rows))
    with open(path, "rb") as f:
        offset, found = tail_start(f, 1500)
        f.seek(offset)
        assert f.read() == b"".join(rows[-1500:]) and found == 1500


def test_reader_follows_appends_truncation_replacement_and_new_files(tmp_path: Path) -> None:
    got: list[bytes] = []
    reader = LogReader(got.append, tail=1, terminal=False)
    log, late = tmp_path / "console.log", tmp_path / "late.log"
    log.write_bytes(b"old\nlast\n")
    reader.read([str(log), str(late)])
    assert got == [b"last\n"]  # the tail applies to what is there at first; late.log absent
    with open(log, "ab") as f:
        f.write(b"more\n")
    late.write_bytes(b"hi\n")
    reader.read([str(log), str(late)])
    assert got[1:] == [b"more\n", b"hi\n"]  # a file that appears later: all of it
    reader.read([str(log), str(late)])
    assert len(got) == 3  # nothing new, nothing written
    log.write_bytes(b"r\n")  # truncated and rewritten: shorter than what was read
    reader.read([str(log)])
    assert got[3:] == [b"r\n"]
    os.rename(log, tmp_path / "console.log.1")
    log.write_bytes(b"new file\n")  # rotated: the new file is read from its start
    reader.read([str(log)])
    assert got[4:] == [b"new file\n"]


def test_show_logs_follows_until_told_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("virtcontainers.cli.logs.FOLLOW_INTERVAL", 0.0)
    log = tmp_path / "console.log"
    log.write_bytes(b"boot\r\n")
    got: list[bytes] = []
    polls = iter([b"one\r", b"\r\n", None])  # each poll appends; the last one says stop

    def still_running() -> bool:
        step = next(polls)
        if step is None:
            with open(log, "ab") as f:
                f.write(b"bye\r")  # written as the VM went away: still shown, CR flushed
            return False
        with open(log, "ab") as f:
            f.write(step)
        return True

    show_logs(lambda: [str(log)], got.append, terminal=True, follow_while=still_running)
    assert b"".join(got) == b"boot\none^M\nbye^M"


def test_tail_spans_the_rotated_log(tmp_path: Path) -> None:
    (tmp_path / "console.log.1").write_bytes(b"a\nb\n")
    (tmp_path / "console.log").write_bytes(b"c\n")
    paths = [str(tmp_path / "console.log.1"), str(tmp_path / "console.log")]
    for lines, expected in ((1, b"c\n"), (2, b"b\nc\n"), (9, b"a\nb\nc\n"), (0, b"")):
        got: list[bytes] = []
        show_logs(lambda: paths, got.append, tail=lines)
        assert b"".join(got) == expected, lines


def test_following_across_a_rotation_loses_and_repeats_nothing(tmp_path: Path) -> None:
    log, old = tmp_path / "console.log", tmp_path / "console.log.1"
    got: list[bytes] = []
    reader = LogReader(got.append, tail=None, terminal=False)

    def paths() -> list[str]:
        return [str(p) for p in (old, log) if p.exists()]

    log.write_bytes(b"one\n")
    reader.read(paths())
    with open(log, "ab") as f:
        f.write(b"two\n")  # written after the last read, just before the rotation
    os.replace(log, old)
    log.write_bytes(b"three\n")
    reader.read(paths())
    assert b"".join(got) == b"one\ntwo\nthree\n"
