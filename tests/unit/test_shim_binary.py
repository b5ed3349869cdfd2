"""The containerd-shim-virtc-v2 binary without containerd: `start` daemonizes a server that
answers the task API and exits on Shutdown; bad bundles and flags are refused by name."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from virtcontainers.shim.main import CONTAINER_TYPE, SANDBOX_ID
from virtcontainers.shim.proto.containerd.runtime.v2.task import shim_pb2 as pb
from virtcontainers.shim.proto.ttrpc import request_pb2
from virtcontainers.shim.service import SERVICE
from virtcontainers.shim.ttrpc import MAX_MESSAGE, Client, Code, Header, MessageType, TtrpcError
from virtcontainers.shim.ttrpc.framing import read_frame

SHIM = [sys.executable, "-m", "virtcontainers.shim"]


def shim(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHIM, *args], cwd=bundle, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: the shim's socket goes beside containerd's (108-byte limit)."""
    path = tempfile.mkdtemp(prefix="vcs-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def flags(address: str, cid: str) -> list[str]:
    return ["-namespace", "ns1", "-address", address, "-publish-binary", "", "-id", cid]


async def test_start_serves_then_shutdown_removes_the_socket(short_tmp: Path) -> None:
    tmp_path = short_tmp
    bundle = tmp_path / "b1"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
    address = str(tmp_path / "containerd.sock")
    cp = shim(bundle, *flags(address, "b1"), "start")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith(f"unix://{tmp_path}/s/")
    path = cp.stdout.removeprefix("unix://")
    assert (bundle / "address").read_text() == cp.stdout
    pid = int((bundle / "shim.pid").read_text())
    # `start` returned (containerd reads its output to the end) while the server runs on in
    # a session of its own, in the bundle, its stdio /dev/null, listening on fd 3.
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/cwd") == str(bundle)
    assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == ["/dev/null"] * 3
    assert os.readlink(f"/proc/{pid}/fd/3").startswith("socket:")
    # A second start for the same container finds the running shim; so does the start of a
    # container of the pod whose sandbox container it is.
    again = shim(bundle, *flags(address, "b1"), "start")
    assert again.stdout == cp.stdout
    app = tmp_path / "app"
    app.mkdir()
    annotations = {CONTAINER_TYPE: "container", SANDBOX_ID: "b1"}
    (app / "config.json").write_text(json.dumps({"annotations": annotations}))
    joined = shim(app, *flags(address, "app"), "start")
    assert (joined.returncode, joined.stdout) == (0, cp.stdout), joined.stderr
    assert not (app / "shim.pid").exists()
    # Bad frames get a status and the shim keeps serving: an oversized frame, a bad service.
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(Header(MAX_MESSAGE + 1, 1, MessageType.REQUEST).pack() + b"\0" * (MAX_MESSAGE + 1))
    header, data = await asyncio.wait_for(read_frame(reader), 10)
    assert header.stream_id == 1
    assert request_pb2.Response.FromString(data).status.code == Code.RESOURCE_EXHAUSTED
    writer.close()
    await writer.wait_closed()
    async with await Client.connect(path) as client:
        with pytest.raises(TtrpcError) as bad:
            await client.call(
                "containerd.task.v3.Task", "Connect", pb.ConnectRequest(), pb.ConnectResponse
            )
        assert bad.value.code == Code.UNIMPLEMENTED
        info = await client.call(SERVICE, "Connect", pb.ConnectRequest(id="b1"), pb.ConnectResponse)
        assert info.shim_pid == pid
        await client.call(SERVICE, "Shutdown", pb.ShutdownRequest(id="b1"), empty_pb2.Empty)
    for _ in range(100):
        if (
            not os.path.exists(f"/proc/{pid}")
            or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        ):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the shim did not exit after Shutdown")
    assert not os.path.exists(path)
    # It left the response `delete` prints (nothing left to clean): containerd runs `delete`
    # after every shim's end.
    left = (bundle / "shim.clean-exit").read_bytes()
    assert pb.DeleteResponse.FromString(left).exited_at.seconds > 0
    argv = [*SHIM, *flags(address, "b1"), "delete"]
    deleted = subprocess.run(argv, cwd=bundle, capture_output=True, timeout=60, check=False)
    assert (deleted.returncode, deleted.stdout) == (0, left), deleted.stderr


def test_delete_prints_a_delete_response(tmp_path: Path) -> None:
    bundle = tmp_path / "b2"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    cp = subprocess.run(
        [*SHIM, *flags(str(tmp_path / "c.sock"), "b2"), "-bundle", str(bundle), "delete"],
        cwd=bundle, capture_output=True, timeout=60, check=False,
        env={**os.environ, "VC_RUN_ROOT": str(tmp_path / "rr")},
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    resp = pb.DeleteResponse.FromString(cp.stdout)
    assert resp.exit_status == 137
    assert resp.exited_at.seconds > 0


def test_delete_after_a_clean_exit_needs_no_zygote_nor_imports(short_tmp: Path) -> None:
    """containerd runs `delete` at every container's end and waits for it: once the shim
    server `start` recorded has exited leaving its response, the binary prints that response
    itself, having waited for the exit, without handing the command to a zygote (which is
    listening here) and without importing json, hashlib, enum or re."""
    import socket

    from virtcontainers.host import process_start_time

    bundle = short_tmp / "b3"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    zygote_dir = short_tmp / "rr" / "factory"
    zygote_dir.mkdir(parents=True)
    zygote = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    zygote.bind(str(zygote_dir / "zygote.sock"))
    zygote.listen(8)
    zygote.setblocking(False)
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    code = (
        "import sys; from virtcontainers.shim.main import main; sys.argv = sys.argv[1:]; "
        "code = main(); sys.stderr.write(' '.join(sorted(sys.modules))); sys.exit(code)"
    )
    try:
        (bundle / "shim.pid").write_text(str(server.pid))
        (bundle / "shim.start_time").write_text(str(process_start_time(server.pid)))
        (bundle / "shim.clean-exit").write_bytes(b"left by the server")
        cp = subprocess.run(
            [sys.executable, "-c", code, "shim", *flags(str(short_tmp / "c.sock"), "b3"), "delete"],
            cwd=bundle, capture_output=True, timeout=60, check=False,
            env={**os.environ, "VC_RUN_ROOT": str(short_tmp / "rr")},
        )  # fmt: skip
        assert server.poll() == 0  # waited for the server's own exit
        with pytest.raises(BlockingIOError):
            zygote.accept()
    finally:
        server.kill()
        server.wait()
        zygote.close()
    assert (cp.returncode, cp.stdout) == (0, b"left by the server"), cp.stderr
    modules = set(cp.stderr.decode().split())
    assert modules.isdisjoint({"json", "hashlib", "enum", "re", "contextlib", "signal"}), modules


def test_delete_kills_the_recorded_shim_never_a_recycled_pid(tmp_path: Path) -> None:
    """`delete` SIGKILLs the shim server `start` recorded (pid and start time) once it had
    its time to exit; a process that got that pid since is never signalled, even one whose
    command line looks like a shim's."""
    from virtcontainers.host import process_start_time
    from virtcontainers.shim.cleanup import _end_shim

    look_alike = [sys.executable, "-c", "import time; time.sleep(60)", "virtcontainers.shim"]
    proc = subprocess.Popen(look_alike)
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        (tmp_path / "shim.pid").write_text(str(proc.pid))
        (tmp_path / "shim.start_time").write_text(str(start - 1))  # the pid was recycled
        _end_shim(str(tmp_path), wait=0.2)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.5)
        (tmp_path / "shim.start_time").write_text(str(start))
        _end_shim(str(tmp_path), wait=0.2)
        assert proc.wait(10) == -9
    finally:
        proc.kill()
        proc.wait()


def test_delete_lets_an_exiting_shim_finish(tmp_path: Path) -> None:
    """containerd runs `delete` as soon as a shim's connection closes, while the shim is still
    ending after Shutdown: `delete` waits for that exit instead of killing it mid-cleanup."""
    from virtcontainers.host import process_start_time
    from virtcontainers.shim.cleanup import _end_shim

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        start = process_start_time(proc.pid)
        (tmp_path / "shim.pid").write_text(str(proc.pid))
        (tmp_path / "shim.start_time").write_text(str(start))
        _end_shim(str(tmp_path), wait=30)
        assert proc.poll() == 0  # it ended by itself, and `delete` returned once it had
    finally:
        proc.kill()
        proc.wait()


def test_bad_bundle_and_flags_are_named(tmp_path: Path) -> None:
    cp = shim(tmp_path, *flags(str(tmp_path / "c.sock"), "x"), "start")
    assert cp.returncode == 2
    assert f"bundle {tmp_path} has no config.json" in cp.stderr
    cp = shim(tmp_path, "-namespace", "n", "-id", "x", "-bogus", "start")
    assert (cp.returncode, "flag provided but not defined: -bogus" in cp.stderr) == (2, True)
    cp = shim(tmp_path, "-namespace", "n", "-id", "x", "frobnicate")
    assert (cp.returncode, "unknown action 'frobnicate'" in cp.stderr) == (2, True)
    cp = shim(tmp_path, "-id", "x", "start")
    assert "namespace cannot be empty" in cp.stderr


def test_debug_log_keeps_pyroute2_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """containerd -debug: the shim's own debug lines reach its log fifo, pyroute2's per-message
    debug chatter (thousands of lines a pod) does not, though pyroute2 is imported after the
    log is set up (the shim imports it at a pod's network) and its import resets its level."""
    import importlib
    import logging

    from virtcontainers.shim import daemon

    os.mkfifo(tmp_path / "log")
    reader = os.open(tmp_path / "log", os.O_RDONLY | os.O_NONBLOCK)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    theirs = logging.getLogger("pyroute2")
    saved = (root.handlers[:], root.level, theirs.level, theirs.handlers[:])
    try:
        daemon._log_to_fifo(debug=True)
        importlib.reload(importlib.import_module("pyroute2.config.log"))
        logging.getLogger("virtcontainers.shim").debug("ours")
        logging.getLogger("pyroute2.netlink").debug("netlink chatter")
        logging.getLogger("pyroute2").warning("theirs, worth a look")
        text = os.read(reader, 65536).decode()
    finally:
        for handler in root.handlers[len(saved[0]) :]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved[1])
        theirs.setLevel(saved[2])
        theirs.handlers[:] = saved[3]
        os.close(reader)
    assert "ours" in text and "theirs, worth a look" in text, text
    assert "netlink chatter" not in text, text
