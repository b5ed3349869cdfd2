"""The console keeper process: a live copy of its pipe, rotated at the cap, never blocking."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtcontainers.drivers import console_keeper


class Keeper:
    """The real keeper script, as the QEMU driver runs it, fed through a pipe."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        read_end, self.write_end = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", console_keeper.__file__, str(path), str(max_bytes)],
            stdin=read_end,
            stderr=subprocess.PIPE,
        )
        os.close(read_end)

    def write(self, data: bytes) -> None:
        os.write(self.write_end, data)

    def close(self, timeout: float = 10) -> int:
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1
        return self.proc.wait(timeout)


@pytest.fixture
def keepers() -> Iterator[list[Keeper]]:
    made: list[Keeper] = []
    yield made
    for k in made:
        k.close()
        assert k.proc.stderr is not None
        k.proc.stderr.close()


def wait_for(path: Path, content: bytes) -> None:
    for _ in range(500):
        if path.exists() and path.read_bytes() == content:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never held {content!r}: {path.read_bytes()!r}")


def test_copies_live_and_exits_at_end_of_file(tmp_path: Path, keepers: list[Keeper]) -> None:
    log = tmp_path / "console.log"
    k = Keeper(log, 1 << 20)
    keepers.append(k)
    k.write(b"boot\r\n")
    wait_for(log, b"boot\r\n")  # on disk while the pipe is still open
    k.write(b"more")
    wait_for(log, b"boot\r\nmore")
    assert k.close() == 0
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert not (tmp_path / "console.log.1").exists()


def test_rotates_at_the_cap_without_losing_bytes(tmp_path: Path, keepers: list[Keeper]) -> None:
    log = tmp_path / "console.log"
    k = Keeper(log, 1000)
    keepers.append(k)
    data = bytes(range(256)) * 10  # 2560 bytes in uneven chunks, one bigger than the cap
    for a, b in ((0, 7), (7, 990), (990, 1003), (1003, 2400), (2400, 2560)):
        k.write(data[a:b])
    assert k.close() == 0
    assert (tmp_path / "console.log.1").read_bytes() == data[1000:2000]
    assert log.read_bytes() == data[2000:]  # the first 1000 bytes went with the older rotation


def test_a_failing_disk_never_blocks_the_writer(tmp_path: Path, keepers: list[Keeper]) -> None:
    log = tmp_path / "console.log"
    log.symlink_to("/dev/full")  # every write fails with ENOSPC
    k = Keeper(log, 1 << 30)
    keepers.append(k)
    for _ in range(64):  # 4 MiB: far more than a pipe holds, so the keeper must drain it
        k.write(b"x" * 65536)
    assert k.close() == 0


@pytest.mark.parametrize("args", [[], ["/tmp/x"], ["/tmp/x", "0"], ["/tmp/x", "lots"]])
def test_bad_arguments(args: list[str]) -> None:
    res = subprocess.run(
        [sys.executable, "-I", "-S", console_keeper.__file__, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    assert res.returncode == 2 and b"MAX_BYTES" in res.stderr


def test_unwritable_log_is_reported(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-I", "-S", console_keeper.__file__, str(tmp_path / "no/dir/x"), "9"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    assert res.returncode == 1 and b"no/dir/x" in res.stderr
