"""Density: host memory per VM, template clones vs cold-booted VMs, and how many fit in 24 GiB.

N clones of one template (256 MiB guest, 1 vCPU, q35, TCG) run at once, agent ready; then N
cold-booted VMs of the same config. For every VM (QEMU and its helpers, such as the console
log keeper) /proc/<pid>/smaps_rollup gives PSS (shared pages divided among their users) and
USS (private pages only). A clone's guest
memory starts as the template's pages (a tmpfs file mapped copy-on-write): those pages are
resident once, whatever the number of clones. So, extrapolated from this small N:

    host memory of M clones ~= template file + M x USS(clone)   (+ shared libraries, small)
    host memory of M cold VMs ~= M x USS(cold)

and the density in 24 GiB is the largest M that fits. This is an extrapolation: it counts
memory only (idle TCG guests also need CPU: on a small host CPU runs out first), assumes
each VM stays as idle as here (guests that touch memory privatize template pages) and
ignores the host kernel's own per-VM cost (page tables, vhost, KVM structures).

    .venv/bin/python benchmarks/density.py [--runs 4] [--quick]   (--runs is N)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import boot
from _lib import Options, Result, main, new_result, summarize, temp_run_root, vm_memory

from virtcontainers.factory import Factory, TemplateStore
from virtcontainers.factory.vm import VM

TITLE = "Density: host memory per VM (PSS/USS) and VMs in 24 GiB"
TEMPLATE = "density"
BUDGET = 24 << 30
SETTLE_S = 1.0
MAX_N = 4
MIB = 1 << 20


def memory_of(vms: list[VM]) -> dict[str, list[float]]:
    """PSS, USS and RSS (bytes) of each VM: its QEMU process and QEMU's helpers."""
    out: dict[str, list[float]] = {"pss": [], "uss": [], "rss": []}
    for vm in vms:
        m = vm_memory(vm.hypervisor.get_pids())
        out["pss"].append(float(m["Pss"]))
        out["uss"].append(float(m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)))
        out["rss"].append(float(m["Rss"]))
    return out


async def settle(vms: list[VM]) -> None:
    """Every agent answers an exec, then give the guests a moment."""
    for vm in vms:
        res = await (await vm.agent()).exec(["true"])
        if res.exit_code != 0:
            raise RuntimeError(f"VM {vm.id}: `true` exited {res.exit_code}")
    await asyncio.sleep(SETTLE_S)


def fits(budget: int, fixed: float, per_vm: float) -> int:
    return max(0, int((budget - fixed) // per_vm)) if per_vm > 0 else 0


async def bench(opts: Options) -> Result:
    n = max(2, min(opts.runs, MAX_N))
    result = new_result("density", TITLE, opts, unit="bytes", n_vms=n, budget_bytes=BUDGET)
    result["runs"], result["warmup"] = n, 0
    async with temp_run_root() as run_root:
        cfg = boot.make_config("q35")
        store = TemplateStore(run_root=run_root)
        info = await store.create(TEMPLATE, cfg)
        clones: list[VM] = []
        cold: list[VM] = []
        try:
            factory = Factory.from_template(TEMPLATE, store=store)
            for _ in range(n):
                clones.append(await factory.get_vm())
            await settle(clones)
            clone_mem = memory_of(clones)
            template_bytes = os.stat(info.memory_path).st_blocks * 512
            for vm in clones:
                await vm.stop()
            clones = []
            direct = Factory.direct(cfg, run_root=run_root)
            for _ in range(n):
                cold.append(await direct.get_vm())
            await settle(cold)
            cold_mem = memory_of(cold)
        finally:
            for vm in clones + cold:
                await vm.stop()
            store.remove(TEMPLATE)
    metrics: dict[str, dict[str, Any]] = {
        "template_clone": {k: summarize(v) for k, v in clone_mem.items()},
        "cold_boot": {k: summarize(v) for k, v in cold_mem.items()},
    }
    result["metrics"] = metrics
    result["template_file_bytes"] = template_bytes
    uss_clone = metrics["template_clone"]["uss"]["mean"]
    uss_cold = metrics["cold_boot"]["uss"]["mean"]
    d_clone = fits(BUDGET, template_bytes, uss_clone)
    d_cold = fits(BUDGET, 0, uss_cold)
    result["density"] = {"template_clone": d_clone, "cold_boot": d_cold}
    result["checks"].append(
        {
            "label": "VMs in 24 GiB: clones / cold boots (extrapolated)",
            "kind": "ratio",
            "value": d_clone / d_cold if d_cold else 0.0,
            "target": None,
            "met": None,
        }
    )
    pss_clones = sum(metrics["template_clone"]["pss"]["samples"])
    pss_cold = sum(metrics["cold_boot"]["pss"]["samples"])
    for label, value in (
        (f"total PSS: {n} clones / {n} cold VMs", pss_clones / pss_cold),
        (
            f"total PSS + template file: {n} clones / {n} cold VMs",
            (pss_clones + template_bytes) / pss_cold,
        ),
    ):
        result["checks"].append(
            {"label": label, "kind": "ratio", "value": value, "target": None, "met": None}
        )
    result["notes"] += [
        f"N = {n} VMs of each kind at once; template file resident: {template_bytes / MIB:.0f} "
        f"MiB of {info.memory_mib} MiB",
        f"per clone: PSS {metrics['template_clone']['pss']['mean'] / MIB:.1f} MiB, USS "
        f"{uss_clone / MIB:.1f} MiB; per cold VM: PSS "
        f"{metrics['cold_boot']['pss']['mean'] / MIB:.1f} MiB, USS {uss_cold / MIB:.1f} MiB",
        f"extrapolated to 24 GiB: {d_clone} clones (template file + N x USS) vs {d_cold} "
        "cold-booted VMs (N x USS); memory only, see the method",
    ]
    result["measured_at"] = time.time()
    return result


if __name__ == "__main__":
    sys.exit(main(bench, __doc__.splitlines()[0]))
