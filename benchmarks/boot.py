"""Cold boot to agent-ready: virtcontainers' QEMU driver versus raw QEMU with the same argv.

Both are timed to the same marker (`VC-AGENT-READY` on the guest console). The raw baseline
runs the exact command line the driver builds (pre-connected QMP fd included), started with
`subprocess.Popen`. Runs alternate after a warm-up; medians and their ratio are printed.

    .venv/bin/python benchmarks/boot.py [--runs 5] [--machine q35|microvm|pc]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import SerialPort
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.guest import ensure_assets
from virtcontainers.types import Socket

MARKER = b"VC-AGENT-READY"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _spawn(argv: list[str], pass_fds: list[int], log_path: str) -> subprocess.Popen[bytes]:
    """Start QEMU the plain way: inherited fds, stdout+stderr to a log."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )


async def wait_marker(console_sock: str, console_log: str, timeout: float) -> None:
    """Wait for MARKER: stream the console socket, then look at what was logged before."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(console_sock)
        try:
            seen = _read(console_log)
            while MARKER not in seen:
                chunk = await reader.read(4096)
                if not chunk:
                    raise RuntimeError("console closed before the ready marker")
                seen = seen[-len(MARKER) :] + chunk
        finally:
            writer.close()


def make_config(machine: str) -> HypervisorConfig:
    assets = ensure_assets()
    return HypervisorConfig(
        kernel_path=assets.kernel,
        initrd_path=assets.initrd,
        memory_size=256,
        num_vcpus=1,
        hypervisor_machine_type=machine,
    )


async def prepare(run_root: str, id: str, machine: str) -> QemuHypervisor:
    drv = QemuHypervisor(run_root=run_root)
    await drv.create_sandbox(id, None, make_config(machine))
    sock = drv.generate_socket(id, use_vsock=False)
    assert isinstance(sock, Socket)
    await drv.add_device(SerialPort(sock))
    return drv


async def boot_virtcontainers(run_root: str, n: int, machine: str) -> float:
    t0 = time.perf_counter()
    drv = await prepare(run_root, f"vc{n}", machine)
    try:
        await drv.start_sandbox(60)
        assert drv.paths is not None
        await wait_marker(drv.paths.console_socket, drv.paths.console_log, 60)
        return time.perf_counter() - t0
    finally:
        await drv.stop_sandbox()


async def boot_raw(run_root: str, n: int, machine: str) -> float:
    drv = await prepare(run_root, f"raw{n}", machine)  # VM dir and argv only; not timed
    assert drv.paths is not None
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    launch = drv.build_launch(qmp_fd=theirs.fileno())
    proc = None
    try:
        t0 = time.perf_counter()
        proc = _spawn(launch.argv, launch.pass_fds, drv.paths.qemu_log)
        theirs.close()
        loop = asyncio.get_running_loop()
        greeting = await loop.sock_recv(ours, 4096)  # chardevs exist once QMP greets
        if not greeting:
            raise RuntimeError(f"raw QEMU exited early: {proc.wait()}")
        await wait_marker(drv.paths.console_socket, drv.paths.console_log, 60)
        return time.perf_counter() - t0
    finally:
        theirs.close()
        ours.close()
        if proc is not None:
            proc.kill()
            proc.wait()
        await drv.stop_sandbox()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--machine", default="q35", choices=["q35", "microvm", "pc"])
    args = ap.parse_args()
    run_root = tempfile.mkdtemp(prefix="vcb-", dir="/tmp")
    ensure_assets()
    print(f"warm-up ({args.machine}) ...", flush=True)
    await boot_virtcontainers(run_root, 0, args.machine)
    await boot_raw(run_root, 0, args.machine)
    vc: list[float] = []
    raw: list[float] = []
    for i in range(1, args.runs + 1):
        first, second = (
            (boot_virtcontainers, boot_raw) if i % 2 else (boot_raw, boot_virtcontainers)
        )
        for fn in (first, second):
            t = await fn(run_root, i, args.machine)
            (vc if fn is boot_virtcontainers else raw).append(t)
            print(f"  run {i} {fn.__name__:20s} {t:.3f}s", flush=True)
    os.rmdir(os.path.join(run_root, "vm"))
    os.rmdir(run_root)
    m_vc, m_raw = statistics.median(vc), statistics.median(raw)
    print(f"machine {args.machine}, {args.runs} runs each, boot to {MARKER.decode()}")
    print(f"  raw qemu        median {m_raw:.3f}s")
    print(f"  virtcontainers  median {m_vc:.3f}s")
    print(f"  ratio           {m_vc / m_raw:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
