"""Exec round trip and `virtc run -- true` end to end, against baselines measured in the same run.

Round trip: `Sandbox.exec(["true"])` on one running sandbox, alternated with an agent ping
(the transport alone: no process is started in the guest). Target: exec median <= 20 ms.

End to end: `virtc run -- true` as a user types it (a new process: Python start-up, imports,
boot, agent, exec, teardown), alternated with, in this process, the cold boot (`Sandbox`
start until the agent answered) and the same whole run (`async with Sandbox(): exec`), and
`virtc --version` (the CLI's own start-up). All use virtc's defaults (1 vCPU, 2048 MiB, q35).

    .venv/bin/python benchmarks/exec.py [--runs 10] [--quick]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from _lib import (
    Candidate,
    Options,
    Result,
    Sample,
    add_limit,
    add_metrics,
    add_ratio,
    alternate,
    main,
    median,
    new_result,
    run_virtc,
    temp_run_root,
)

from virtcontainers.sandbox import Sandbox

TITLE = "Exec round trip and `virtc run -- true` end to end (q35, TCG)"
EXEC_TARGET = 0.020
ROUND_TRIPS_PER_RUN = 20
"""Round-trip samples per run of the suite (`--runs 10` -> 200 of each)."""


async def round_trips(opts: Options, run_root: str) -> dict[str, dict[str, list[float]]]:
    async with Sandbox("rtt", run_root=run_root) as sb:
        agent = await sb.agent()

        async def exec_true(_i: int) -> Sample:
            t0 = time.perf_counter()
            res = await sb.exec(["true"])
            t = time.perf_counter() - t0
            if res.exit_code != 0:
                raise RuntimeError(f"true exited {res.exit_code} in the guest")
            return {"round_trip": t}

        async def ping(_i: int) -> Sample:
            t0 = time.perf_counter()
            await agent.ping()
            return {"round_trip": time.perf_counter() - t0}

        runs = opts.scaled(ROUND_TRIPS_PER_RUN)
        print(f"exec round trips: {runs} of each after {opts.warmup * 5} warm-up", flush=True)
        cands: dict[str, Candidate] = {"exec_true": exec_true, "agent_ping": ping}
        return await alternate(cands, runs, opts.warmup * 5, verbose=False)


async def end_to_end(opts: Options, run_root: str) -> dict[str, dict[str, list[float]]]:
    env = dict(os.environ, VC_RUN_ROOT=run_root)
    counter = iter(range(1_000_000))

    async def virtc_run(_i: int) -> Sample:
        t = await asyncio.to_thread(run_virtc, ["run", "--", "true"], env)
        return {"wall": t}

    async def virtc_version(_i: int) -> Sample:
        return {"wall": await asyncio.to_thread(run_virtc, ["--version"], env)}

    async def cold_boot(_i: int) -> Sample:
        sb = Sandbox(f"cb{next(counter)}", run_root=run_root)
        t0 = time.perf_counter()
        try:
            await sb.start()
            return {"wall": time.perf_counter() - t0}
        finally:
            await sb.stop()

    async def sandbox_run(_i: int) -> Sample:
        t0 = time.perf_counter()
        async with Sandbox(f"sr{next(counter)}", run_root=run_root) as sb:
            res = await sb.exec(["true"])
        t = time.perf_counter() - t0
        if res.exit_code != 0:
            raise RuntimeError(f"true exited {res.exit_code} in the guest")
        return {"wall": t}

    print("virtc run -- true, end to end", flush=True)
    cands: dict[str, Candidate] = {
        "virtc_run": virtc_run,
        "cold_boot": cold_boot,
        "sandbox_run": sandbox_run,
        "virtc_version": virtc_version,
    }
    return await alternate(cands, opts.runs, opts.warmup, settle=0.5)


async def bench(opts: Options) -> Result:
    result = new_result("exec", TITLE, opts, unit="s")
    async with temp_run_root() as run_root:
        samples = await round_trips(opts, run_root)
        samples.update(await end_to_end(opts, run_root))
    add_metrics(result, samples)
    result["round_trips_per_run"] = ROUND_TRIPS_PER_RUN
    add_limit(
        result,
        "exec `true` round trip median",
        median(result, "exec_true", "round_trip"),
        EXEC_TARGET,
    )
    add_ratio(
        result, "exec `true` / agent ping (median)", ("exec_true", "round_trip"),
        ("agent_ping", "round_trip"),
    )  # fmt: skip
    add_ratio(
        result, "exec `true` / agent ping (p99)", ("exec_true", "round_trip"),
        ("agent_ping", "round_trip"), stat="p99",
    )  # fmt: skip
    add_ratio(result, "virtc run -- true / cold boot", ("virtc_run", "wall"), ("cold_boot", "wall"))
    add_ratio(
        result, "in-process Sandbox run / cold boot", ("sandbox_run", "wall"),
        ("cold_boot", "wall"),
    )  # fmt: skip
    vr, sr, vv = (median(result, c, "wall") for c in ("virtc_run", "sandbox_run", "virtc_version"))
    if vr is not None and sr is not None and vv is not None:
        result["notes"].append(
            f"virtc run - in-process run = {vr - sr:.3f} s of CLI cost "
            f"(virtc --version alone: {vv:.3f} s)"
        )
    return result


if __name__ == "__main__":
    sys.exit(main(bench, __doc__.splitlines()[0]))
