"""VM templates and the VM cache server versus cold boot: time to a ready agent, and memory.

Latency (candidates alternated after a warm-up, one template made before the runs, untimed):

- cold_boot: `boot_vm(config)`: create, launch QEMU, boot, agent answers a ping;
- clone: `TemplateStore.clone(name, fresh_identity=False)` (metric `running`: QEMU restored
  and running) then the agent's ping (metric `agent_ready`);
- clone_fresh: `clone(name)`: the same plus RNG reseed and clock set through the agent;
- get_base_vm: the cache server (a daemon with 2 clones of the template, gRPC on a Unix
  socket): `GetBaseVM`, take the VM over (`from_grpc`), resume it, agent ping. Every run of
  every candidate starts with the server's pool full, so refills never overlap a measurement.
- cache_get_vm: `Factory.connect().get_vm()`: the same plus fresh identity.

Memory: N clones running at once, agent ready, versus N cold-booted VMs of the same config:
total PSS over their processes (QEMU and its helpers; /proc/<pid>/smaps_rollup), and the
same plus the template's memory file resident on its tmpfs (pages no clone maps are in
nobody's PSS).

    .venv/bin/python benchmarks/template.py [--runs 10] [--n 16] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _lib import (
    Candidate,
    Options,
    Result,
    Sample,
    Skip,
    add_metrics,
    add_ratio,
    alternate,
    new_result,
    pool_full,
    print_result,
    temp_run_root,
    vm_memory,
)

from virtcontainers.config import HypervisorConfig
from virtcontainers.factory import (
    VM,
    DaemonSpec,
    Factory,
    TemplateStore,
    VMConfig,
    boot_vm,
    start_daemon,
    stop_daemon,
)
from virtcontainers.factory.rpc.client import RemoteCache
from virtcontainers.guest import default_kernel_params, ensure_assets

TITLE = "VM templates and the VM cache server vs cold boot (q35, TCG, 1 vCPU, 256 MiB)"
TEMPLATE = "bench"
TIMEOUT = 120.0
POOL = 2
SETTLE_S = 2.0
BOOT_BATCH = 2
"""Cold VMs booted at a time for the memory comparison (one per host core here)."""


def make_config() -> HypervisorConfig:
    assets = ensure_assets()
    return HypervisorConfig(
        kernel_path=assets.kernel,
        initrd_path=assets.initrd,
        kernel_params=default_kernel_params(),
        memory_size=256,
        num_vcpus=1,
    )


def timed(
    steps: Callable[[], Awaitable[tuple[VM, Sample]]], before: Callable[[], Awaitable[None]]
) -> Candidate:
    """A candidate: `before()` (untimed), then `steps()` (which times itself), stop the VM."""

    async def run(_i: int) -> Sample:
        await before()
        vm, sample = await steps()
        await vm.stop()
        return sample

    return run


async def latency(
    opts: Options, run_root: str, store: TemplateStore, cfg: HypervisorConfig, result: Result
) -> None:
    await start_daemon(
        DaemonSpec(size=POOL, template=TEMPLATE, template_root=store.root), run_root=run_root
    )
    remote = await RemoteCache.connect(run_root=run_root)
    factory = Factory(remote, fallback=False, run_root=run_root)
    vmc = VMConfig.of(cfg)
    try:

        async def full() -> None:
            await pool_full(run_root, POOL, TIMEOUT)

        async def cold() -> tuple[VM, Sample]:
            t0 = time.perf_counter()
            vm = await boot_vm(vmc, run_root=run_root, timeout=TIMEOUT)
            return vm, {"agent_ready": time.perf_counter() - t0}

        async def clone() -> tuple[VM, Sample]:
            t0 = time.perf_counter()
            vm = await store.clone(TEMPLATE, fresh_identity=False, timeout=TIMEOUT)
            t1 = time.perf_counter()
            await vm.wait_agent(TIMEOUT)
            return vm, {"running": t1 - t0, "agent_ready": time.perf_counter() - t0}

        async def clone_fresh() -> tuple[VM, Sample]:
            t0 = time.perf_counter()
            vm = await store.clone(TEMPLATE, timeout=TIMEOUT)
            return vm, {"agent_ready": time.perf_counter() - t0}

        async def get_base_vm() -> tuple[VM, Sample]:
            t0 = time.perf_counter()
            vm = await remote.get_base_vm(timeout=TIMEOUT)
            t1 = time.perf_counter()
            await vm.resume()
            await vm.wait_agent(TIMEOUT)
            return vm, {"rpc": t1 - t0, "agent_ready": time.perf_counter() - t0}

        async def cache_get_vm() -> tuple[VM, Sample]:
            t0 = time.perf_counter()
            vm = await factory.get_vm(timeout=TIMEOUT)
            return vm, {"agent_ready": time.perf_counter() - t0}

        candidates: dict[str, Candidate] = {
            "cold_boot": timed(cold, full),
            "clone": timed(clone, full),
            "clone_fresh": timed(clone_fresh, full),
            "get_base_vm": timed(get_base_vm, full),
            "cache_get_vm": timed(cache_get_vm, full),
        }
        samples = await alternate(candidates, opts.runs, opts.warmup)
    finally:
        await remote.close()
        await stop_daemon(run_root)
    add_metrics(result, samples)
    cold_ready = ("cold_boot", "agent_ready")
    add_ratio(
        result,
        "clone to agent-ready / cold boot",
        ("clone", "agent_ready"),
        cold_ready,
        target=0.10,
    )
    add_ratio(
        result, "clone + fresh identity / cold boot", ("clone_fresh", "agent_ready"), cold_ready
    )
    add_ratio(
        result,
        "GetBaseVM to agent-ready / cold boot",
        ("get_base_vm", "agent_ready"),
        cold_ready,
        target=0.05,
    )
    add_ratio(
        result, "cache Factory.get_vm / cold boot", ("cache_get_vm", "agent_ready"), cold_ready
    )


async def memory(
    n: int, run_root: str, store: TemplateStore, cfg: HypervisorConfig, result: Result
) -> None:
    """Total PSS of n clones vs n cold VMs (measured one group after the other)."""

    async def total_pss(vms: list[VM]) -> tuple[int, list[int]]:
        for vm in vms:
            res = await (await vm.agent()).exec(["true"])
            if res.exit_code != 0:
                raise RuntimeError(f"VM {vm.id}: `true` exited {res.exit_code}")
        await asyncio.sleep(SETTLE_S)
        per_vm = [vm_memory(vm.hypervisor.get_pids())["Pss"] for vm in vms]
        return sum(per_vm), per_vm

    vms: list[VM] = []
    try:
        for _ in range(n):
            vms.append(await store.clone(TEMPLATE, timeout=TIMEOUT))
        clones_pss, clone_each = await total_pss(vms)
        st = os.statvfs(store.get(TEMPLATE).directory)
        template_file = (st.f_blocks - st.f_bfree) * st.f_frsize
    finally:
        for vm in vms:
            await vm.stop()
    vms = []
    vmc = VMConfig.of(cfg)
    try:
        while len(vms) < n:
            batch = min(BOOT_BATCH, n - len(vms))
            vms += await asyncio.gather(
                *(boot_vm(vmc, run_root=run_root, timeout=TIMEOUT) for _ in range(batch))
            )
        cold_pss, cold_each = await total_pss(vms)
    finally:
        for vm in vms:
            await vm.stop()
    mib = 1 << 20
    result["memory"] = {
        "n": n,
        "clones_total_pss_mib": clones_pss / mib,
        "cold_total_pss_mib": cold_pss / mib,
        "template_file_resident_mib": template_file / mib,
        "clone_pss_mib": [round(x / mib, 1) for x in clone_each],
        "cold_pss_mib": [round(x / mib, 1) for x in cold_each],
    }
    for label, value, target in (
        (f"total PSS: {n} clones / {n} cold VMs", clones_pss / cold_pss, 0.40),
        (
            f"total PSS + template file: {n} clones / {n} cold VMs",
            (clones_pss + template_file) / cold_pss,
            None,
        ),
    ):
        result["checks"].append(
            {
                "label": label,
                "kind": "ratio",
                "value": value,
                "target": target,
                "met": None if target is None else value <= target,
            }
        )
    result["notes"].append(
        f"memory: {n} clones {clones_pss / mib:.0f} MiB PSS in total (+ template file "
        f"{template_file / mib:.0f} MiB resident on its tmpfs), {n} cold VMs "
        f"{cold_pss / mib:.0f} MiB PSS in total"
    )


async def bench(opts: Options, n: int) -> Result:
    result = new_result("template", TITLE, opts, unit="s")
    if os.geteuid() != 0:
        raise Skip("the template store mounts a tmpfs: run as root")
    cfg = make_config()
    async with temp_run_root() as run_root:
        store = TemplateStore(run_root=run_root)
        t0 = time.perf_counter()
        info = await store.create(TEMPLATE, cfg)
        result["template_create_s"] = time.perf_counter() - t0
        try:
            await latency(opts, run_root, store, cfg, result)
            if n > 0:
                await memory(n, run_root, store, cfg, result)
        finally:
            store.remove(TEMPLATE)
    result["notes"].append(
        f"template: {info.memory_mib} MiB on a tmpfs, made once in "
        f"{result['template_create_s']:.2f} s (boot to agent {info.boot_seconds:.2f} s)"
    )
    return result


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=TITLE)
    ap.add_argument("--runs", type=int, default=None, help="measured runs per candidate")
    ap.add_argument("--warmup", type=int, default=1, help="discarded runs per candidate")
    ap.add_argument("--n", type=int, default=16, help="VMs per group in the memory test")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 runs, n=2")
    ap.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = ap.parse_args(argv)
    runs = args.runs if args.runs is not None else (2 if args.quick else 10)
    n = 2 if args.quick and args.n == 16 else args.n
    opts = Options(runs=runs, warmup=args.warmup, quick=args.quick)
    try:
        result: dict[str, Any] = asyncio.run(bench(opts, n))
    except Skip as exc:
        print(f"skipped: {exc}")
        return 0
    print_result(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
