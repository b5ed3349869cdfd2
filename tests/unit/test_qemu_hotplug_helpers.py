"""Helper daemons of the QEMU driver (virtiofsd, qemu-storage-daemon): start, failure, stop,
persistence, and their command lines."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from leaks import running
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive, SharedFS
from virtcontainers.drivers import virtiofsd
from virtcontainers.drivers.helpers import Helpers, is_listening
from virtcontainers.drivers.qemu import storage_daemon
from virtcontainers.errors import AssetError, ConfigError, LaunchError, VMTimeoutError


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "daemon"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


LISTEN = (
    'exec python3 -c "import socket,sys,time; s=socket.socket(socket.AF_UNIX); '
    's.bind(sys.argv[1]); s.listen(); time.sleep(60)" "$1"'
)


async def test_start_waits_for_the_socket_then_stop_removes_everything(tmp_path: Path) -> None:
    helpers = Helpers()
    sock = str(tmp_path / "d.sock")
    extra = tmp_path / "d.pid"
    extra.write_text("1")
    h = await helpers.start(
        "virtiofsd",
        "fs-a",
        [script(tmp_path, LISTEN), sock],
        socket=sock,
        log_path=str(tmp_path / "d.log"),
        timeout=10,
        leftovers=[str(extra)],
    )
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(sock)  # listening for real
    assert helpers.pids() == [h.pid] and helpers.pids("virtiofsd") == [h.pid]
    assert helpers.pids("qemu-storage-daemon") == []
    with pytest.raises(LaunchError, match="a virtiofsd for fs-a is already running"):
        await helpers.start("virtiofsd", "fs-a", ["true"], socket=sock, log_path="", timeout=1)
    await helpers.stop_all()
    assert not running(h.pid)
    assert helpers.pids() == [] and not os.path.exists(sock) and not extra.exists()


async def test_daemon_exiting_at_start_is_a_launch_error(tmp_path: Path) -> None:
    helpers = Helpers()
    sock = str(tmp_path / "d.sock")
    argv = [script(tmp_path, 'echo "no such export" >&2; exit 4')]
    with pytest.raises(LaunchError) as exc:
        await helpers.start(
            "qemu-storage-daemon",
            "vublk-d",
            argv,
            socket=sock,
            log_path=str(tmp_path / "d.log"),
            timeout=10,
        )
    assert exc.value.exit_code == 4 and "no such export" in exc.value.log_tail
    assert "qemu-storage-daemon for vublk-d exited during start-up" in str(exc.value)
    assert helpers.pids() == []


async def test_daemon_that_never_listens_is_killed(tmp_path: Path) -> None:
    helpers = Helpers()
    pidfile = tmp_path / "pid"
    argv = [script(tmp_path, f"echo $$ > {pidfile}; exec sleep 60")]
    with pytest.raises(VMTimeoutError, match=r"did not listen on .* within 0\.5s"):
        await helpers.start(
            "virtiofsd",
            "fs-a",
            argv,
            socket=str(tmp_path / "s"),
            log_path=str(tmp_path / "d.log"),
            timeout=0.5,
        )
    assert not running(int(pidfile.read_text()))
    assert helpers.pids() == []


async def test_persisted_helpers_are_stopped_by_another_instance(tmp_path: Path) -> None:
    first = Helpers()
    sock = str(tmp_path / "d.sock")
    h = await first.start(
        "virtiofsd",
        "fs-a",
        [script(tmp_path, LISTEN), sock],
        socket=sock,
        log_path=str(tmp_path / "d.log"),
        timeout=10,
    )
    second = Helpers()
    second.load(first.save())
    assert second.pids() == [h.pid]
    await second.stop("fs-a")
    assert not running(h.pid) and not os.path.exists(sock)
    await first.stop_all()  # already gone: nothing to do, no error


def test_virtiofsd_argv(tmp_path: Path) -> None:
    daemon = script(tmp_path, "exit 0")
    cfg = HypervisorConfig(virtio_fs_daemon=daemon, virtio_fs_extra_args=["--thread-pool-size=1"])
    share = SharedFS(id="s0", source=str(tmp_path), mount_tag="t")
    assert virtiofsd.argv(cfg, "qemu", share, "/run/x.sock") == [
        daemon,
        "--thread-pool-size=1",
        "--socket-path=/run/x.sock",
        "-o",
        f"source={tmp_path}",
        "-o",
        "cache=auto",
    ]
    # The project's own options come last (virtiofsd takes the last of each), and an extra
    # argument outside the allowlist never reaches the command line.
    cfg.virtio_fs_extra_args = ["-o", "source=/"]
    with pytest.raises(ConfigError, match="'-o source=/' is not allowed"):
        virtiofsd.argv(cfg, "qemu", share, "/run/x.sock")
    cfg.virtio_fs_extra_args = []
    cfg.virtio_fs_cache = "sometimes"
    with pytest.raises(ConfigError, match="virtio_fs_cache: 'sometimes'"):
        virtiofsd.argv(cfg, "qemu", share, "/run/x.sock")
    cfg.virtio_fs_cache = "none"
    cfg.debug = True
    assert virtiofsd.argv(cfg, "clh", share, "/run/x.sock")[-3:] == ["-o", "cache=none", "-d"]
    # A share's own cache mode (a container's root: always) wins over the config's.
    # Its names and attributes are kept ROOT_TIMEOUT s, unless the extra arguments say else.
    root = SharedFS(id="ctr", source=str(tmp_path), mount_tag="t", cache=virtiofsd.ROOT_CACHE)
    cfg.virtio_fs_extra_args = ["-o", "timeout=5"]
    assert virtiofsd.argv(cfg, "clh", root, "/run/x.sock")[1:5] == [
        "-o", f"timeout={virtiofsd.ROOT_TIMEOUT}", "-o", "timeout=5"
    ]  # fmt: skip
    assert virtiofsd.argv(cfg, "clh", root, "/run/x.sock")[-3:] == ["-o", "cache=always", "-d"]
    assert virtiofsd.argv(cfg, "clh", share, "/run/x.sock")[1:3] == ["-o", "timeout=5"]
    cfg.virtio_fs_extra_args = []
    with pytest.raises(ConfigError, match="shared fs ctr: unknown cache mode 'sometimes'"):
        SharedFS(id="ctr", source=str(tmp_path), mount_tag="t", cache="sometimes")
    cfg.virtio_fs_daemon = str(tmp_path / "missing")
    with pytest.raises(
        AssetError, match=r"^clh: virtio-fs daemon .*missing.* is not an executable"
    ):
        virtiofsd.argv(cfg, "clh", share, "/run/x.sock")
    cfg.virtio_fs_daemon = str(tmp_path)  # a directory is not an executable file
    with pytest.raises(AssetError, match=r"^qemu: virtio-fs daemon .* is not an executable file"):
        virtiofsd.daemon_path(cfg, "qemu")
    assert virtiofsd.pid_file("/run/vc/x.sock") == "/run/virtiofsd/.run.vc.x.sock.pid"


def test_storage_daemon_argv() -> None:
    drive = BlockDrive(id="d0", path="/data/d0.qcow2", format="qcow2", read_only=True)
    assert storage_daemon.argv("/usr/bin/qsd", drive, "/run/vu.sock") == [
        "/usr/bin/qsd",
        "--blockdev",
        "driver=file,node-name=file0,filename=/data/d0.qcow2,read-only=on",
        "--blockdev",
        "driver=qcow2,node-name=disk0,file=file0,read-only=on",
        "--export",
        "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,"
        "addr.path=/run/vu.sock,writable=off",
    ]


def test_storage_daemon_binary_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VC_QEMU_STORAGE_DAEMON", str(tmp_path / "absent"))
    with pytest.raises(AssetError, match="qemu-storage-daemon not found"):
        storage_daemon.binary_path()


def test_a_socket_counts_as_ready_once_it_listens(tmp_path: Path) -> None:
    """A daemon binds before it listens: its socket file alone is not ready (a connect then
    is refused, as QEMU's chardev-add to a starting virtiofsd was under load)."""
    path = str(tmp_path / "d.sock")
    assert not is_listening(path)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        assert not is_listening(path)
        s.listen(1)
        assert is_listening(path)
