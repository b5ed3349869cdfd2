"""Agent round trips: the guest agent in a QEMU (TCG) guest versus the same agent on the host.

Both candidates run the agent built from `guest/agent/agent.c` and are driven by the same
`AgentClient`: "guest" over the virtio-serial port of one VM booted for the benchmark,
"host" over a Unix socket to `init --unix PATH` (no virtualization: the baseline). Each run
times a ping, an exec of `true`, an exec of `cat` returning a 1 MiB file, and 10
concurrent execs of `true`.

    .venv/bin/python benchmarks/exec_agent.py [--runs 10] [--quick]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from _lib import (
    MARKER,
    Candidate,
    Options,
    Result,
    Sample,
    add_metrics,
    add_ratio,
    alternate,
    main,
    new_result,
)

from virtcontainers.agent import AgentClient
from virtcontainers.guest import default_kernel_params, ensure_assets
from virtcontainers.guest.initrd import compile_agent
from virtcontainers.types import serialize_params

BOOT_TIMEOUT = 120.0


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


@asynccontextmanager
async def guest_agent(workdir: str) -> AsyncIterator[str]:
    """Boot one TCG guest from the project's assets; yield its agent socket path."""
    assets = ensure_assets()
    sock, log = os.path.join(workdir, "agent.sock"), os.path.join(workdir, "console.log")
    cmdline = " ".join(serialize_params(default_kernel_params("ttyS0"), "="))
    argv = [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "256",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", assets.kernel, "-initrd", assets.initrd, "-append", cmdline,
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent0,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent0,name=agent.channel.0",
        "-serial", f"file:{log}", "-monitor", "none",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while MARKER not in _read(log):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"guest did not boot (exit {proc.returncode})")
            await asyncio.sleep(0.05)
        yield sock
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@asynccontextmanager
async def host_agent(workdir: str) -> AsyncIterator[str]:
    """Run the agent binary on the host with `--unix`; yield its socket path."""
    binary, sock = os.path.join(workdir, "init"), os.path.join(workdir, "host-agent.sock")
    compile_agent(binary, workdir)
    proc = await asyncio.create_subprocess_exec(binary, "--unix", sock, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if await proc.stdout.readline() != MARKER + b"\n":
            raise RuntimeError("host agent did not start")
        yield sock
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@asynccontextmanager
async def agent_clients(prefix: str) -> AsyncIterator[tuple[str, dict[str, AgentClient]]]:
    """A work directory and clients of the agent in a TCG guest ("guest") and on the host
    ("host"); closes both and removes the directory on exit."""
    workdir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        async with guest_agent(workdir) as gsock, host_agent(workdir) as hsock:
            clients = {
                "guest": await AgentClient.connect(gsock, 30),
                "host": await AgentClient.connect(hsock, 10),
            }
            try:
                yield workdir, clients
            finally:
                for c in clients.values():
                    await c.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def one_run(client: AgentClient, blob: str) -> Sample:
    """Time each operation once."""
    sample: Sample = {}
    t = time.perf_counter()
    await client.ping()
    sample["ping"] = time.perf_counter() - t
    t = time.perf_counter()
    res = await client.exec(["true"])
    sample["exec_true"] = time.perf_counter() - t
    assert res.exit_code == 0
    t = time.perf_counter()
    res = await client.exec(["cat", blob])
    sample["exec_1mib"] = time.perf_counter() - t
    assert len(res.stdout) == 1 << 20
    t = time.perf_counter()
    results = await asyncio.gather(*(client.exec(["true"]) for _ in range(10)))
    sample["exec_10x"] = time.perf_counter() - t
    assert all(r.exit_code == 0 for r in results)
    return sample


async def bench(opts: Options) -> Result:
    result = new_result("exec_agent", "Agent round trips: TCG guest vs host baseline", opts)
    async with agent_clients("vcb-agent-") as (workdir, clients):
        blobs = {"guest": "/tmp/blob", "host": os.path.join(workdir, "blob")}
        for name, c in clients.items():
            await c.write_file(blobs[name], os.urandom(1 << 20))

        def candidate(client: AgentClient, blob: str) -> Candidate:
            async def run(_: int) -> Sample:
                return await one_run(client, blob)

            return run

        candidates = {name: candidate(c, blobs[name]) for name, c in clients.items()}
        samples = await alternate(candidates, opts.runs, opts.warmup)
    add_metrics(result, samples)
    for metric in ("ping", "exec_true", "exec_1mib", "exec_10x"):
        add_ratio(result, f"{metric}: guest / host", ("guest", metric), ("host", metric))
    result["notes"].append("guest: QEMU q35 TCG, 1 vCPU, 256 MiB; host: the same agent binary")
    return result


if __name__ == "__main__":
    sys.exit(main(bench, __doc__ or ""))
