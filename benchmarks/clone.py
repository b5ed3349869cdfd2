"""Template clone and VM cache versus cold boot, through the factory (q35, TCG).

Every candidate ends at the same point: a running VM whose agent answered. `get_vm` is
`Factory.get_vm()` (the base VM, resumed, agent answered, RNG reseeded and clock set);
`get_base_vm` is the strategy's `get_base_vm()` alone (a template clone restored and running;
a VM taken from the cache, still paused). Candidates:

- cold_boot: `Factory.direct(cfg).get_vm()` (a plain boot, `boot_vm`);
- template / template_base: a template made once before the runs (not timed);
- cache / cache_base: an in-process `VMCache` of 1 directly booted VM. Every run, of every
  candidate, starts with the cache full, so its background refill never overlaps another
  candidate's measurement (a cache run still pays for the refill it starts itself).

    .venv/bin/python benchmarks/clone.py [--runs 10] [--quick]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable

import boot
from _lib import (
    Candidate,
    Options,
    Result,
    Sample,
    add_metrics,
    add_ratio,
    alternate,
    main,
    new_result,
    temp_run_root,
)

from virtcontainers.factory import (
    DirectBase,
    Factory,
    FactoryBase,
    TemplateBase,
    TemplateStore,
    VMCache,
    VMConfig,
)
from virtcontainers.factory.vm import VM

TITLE = "Template clone and VM cache vs cold boot (q35, TCG)"
TEMPLATE = "bench"
TIMEOUT = 120.0


def timed(
    make: Callable[[], Awaitable[VM]], metric: str, before: Callable[[], Awaitable[None]]
) -> Candidate:
    """A candidate: wait for `before` (untimed), time `make()`, stop the VM (untimed)."""

    async def run(_i: int) -> Sample:
        await before()
        t0 = time.perf_counter()
        vm = await make()
        t = time.perf_counter() - t0
        await vm.stop()
        return {metric: t}

    return run


async def bench(opts: Options) -> Result:
    """Make the template and fill the cache, then alternate all strategies."""
    result = new_result("clone", TITLE, opts, unit="s")
    async with temp_run_root() as run_root:
        cfg = boot.make_config("q35")
        store = TemplateStore(run_root=run_root)
        cache = VMCache(DirectBase(VMConfig.of(cfg), run_root=run_root), 1)
        t0 = time.perf_counter()
        info = await store.create(TEMPLATE, cfg)
        result["template_create_s"] = time.perf_counter() - t0
        try:
            direct = Factory.direct(cfg, run_root=run_root)
            template = Factory.from_template(TEMPLATE, store=store)
            template_base: FactoryBase = TemplateBase(store, TEMPLATE)
            cached = Factory(cache, fallback=False, run_root=run_root)
            await cache.start()

            async def full() -> None:
                await cache.wait_full(TIMEOUT)

            candidates: dict[str, Candidate] = {
                "cold_boot": timed(lambda: direct.get_vm(timeout=TIMEOUT), "get_vm", full),
                "template": timed(lambda: template.get_vm(timeout=TIMEOUT), "get_vm", full),
                "template_base": timed(
                    lambda: template_base.get_base_vm(timeout=TIMEOUT), "get_base_vm", full
                ),
                "cache": timed(lambda: cached.get_vm(timeout=TIMEOUT), "get_vm", full),
                "cache_base": timed(
                    lambda: cache.get_base_vm(timeout=TIMEOUT), "get_base_vm", full
                ),
            }
            samples = await alternate(candidates, opts.runs, opts.warmup)
        finally:
            await cache.close()
            store.remove(TEMPLATE)
    add_metrics(result, samples)
    for cand, metric in (
        ("template", "get_vm"),
        ("template_base", "get_base_vm"),
        ("cache", "get_vm"),
        ("cache_base", "get_base_vm"),
    ):
        add_ratio(result, f"{cand} {metric} / cold boot", (cand, metric), ("cold_boot", "get_vm"))
    result["notes"].append(
        f"template: {info.memory_mib} MiB guest memory on a tmpfs "
        f"({'mounted by the store' if info.tmpfs else 'a directory'}), created once in "
        f"{result['template_create_s']:.2f} s (boot {info.boot_seconds:.2f} s)"
    )
    return result


if __name__ == "__main__":
    sys.exit(main(bench, __doc__.splitlines()[0]))
