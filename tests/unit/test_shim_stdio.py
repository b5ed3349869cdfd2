"""Process stdio as containerd hands it over: binary:// logging programs, file://, FIFOs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from virtcontainers.shim.stdio import ProcessIO, Stdio, StdioError

LOGGER = """#!/bin/sh
# containerd's logging-binary contract: output on fds 3 and 4, ready by closing fd 5.
exec 5>&-
out="$2"
echo "id=$CONTAINER_ID ns=$CONTAINER_NAMESPACE args=$*" > "$out"
cat <&3 >> "$out"
cat <&4 >> "$out"
"""


async def test_binary_logger_gets_output_on_fds_3_and_4(tmp_path: Path) -> None:
    logger = tmp_path / "logger"
    logger.write_text(LOGGER)
    logger.chmod(0o755)
    out = tmp_path / "log.txt"
    uri = f"binary://{logger}?out={out}"
    io = await ProcessIO.open(Stdio(stdout=uri, stderr=uri), "c1", "ns1")
    await io.write_stdout(b"to stdout\n")
    await io.write_stderr(b"to stderr\n")
    await io.close()  # waits for the logger to exit
    assert out.read_text() == f"id=c1 ns=ns1 args=out {out}\nto stdout\nto stderr\n"


async def test_file_uri_appends_both_streams(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.log"
    uri = f"file://{path}"
    for text in (b"one\n", b"two\n"):
        io = await ProcessIO.open(Stdio(stdout=uri, stderr=uri), "c1", "ns1")
        await io.write_stdout(text)
        await io.write_stderr(b"err\n")
        await io.close()
    assert path.read_bytes() == b"one\nerr\ntwo\nerr\n"


async def test_fifo_output_and_stdin(tmp_path: Path) -> None:
    out, inp = tmp_path / "out", tmp_path / "in"
    os.mkfifo(out)
    os.mkfifo(inp)
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    io = await ProcessIO.open(Stdio(stdin=str(inp), stdout=str(out)), "c1", "ns1")

    def feed() -> None:
        with open(inp, "wb") as f:
            f.write(b"input bytes")

    got: list[bytes] = []

    async def write(data: bytes) -> None:
        got.append(data)

    async def close() -> None:
        got.append(b"<closed>")

    feeding = asyncio.ensure_future(asyncio.to_thread(feed))
    await io.copy_stdin(write, close, grace=5)
    await feeding
    assert b"".join(got) == b"input bytes<closed>"
    await io.write_stdout(b"out\n")
    await io.close()
    assert os.read(reader, 100) == b"out\n"
    os.close(reader)


async def test_stdin_nobody_writes_is_empty(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    os.mkfifo(inp)
    io = await ProcessIO.open(Stdio(stdin=str(inp)), "c1", "ns1")
    got: list[bytes] = []

    async def write(data: bytes) -> None:
        got.append(data)

    async def close() -> None:
        got.append(b"<closed>")

    await io.copy_stdin(write, close, grace=0.05)
    assert got == [b"<closed>"]
    await io.close()


async def test_bad_uris_are_named() -> None:
    with pytest.raises(StdioError, match="unsupported stdio URI scheme 'http'"):
        await ProcessIO.open(Stdio(stdout="http://x/y"), "c1", "ns1")
    with pytest.raises(StdioError, match="logging binary /nonexistent/logger"):
        await ProcessIO.open(Stdio(stdout="binary:///nonexistent/logger"), "c1", "ns1")
