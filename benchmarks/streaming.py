"""Streaming delay of a started process: a line written in the guest reaches the host iterator.

A `cat` started with `AgentClient.start_process` in a QEMU (TCG) guest ("guest", over
virtio-serial) and in the same agent run on the host ("host", `init --unix PATH`, the
baseline). Each sample writes one line to cat's stdin and times until `proc.stdout` yields
it back: the line's whole trip host -> guest process -> host iterator, an upper bound of the
one-way streaming delay (guest process writes -> iterator yields). Target: median <= 5 ms.

    .venv/bin/python benchmarks/streaming.py [--runs 10] [--quick]
"""

from __future__ import annotations

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
)
from exec_agent import agent_clients

from virtcontainers.agent import Process

LINES_PER_RUN = 20
TARGET = 0.005


async def line_trip(proc: Process, i: int) -> float:
    """Seconds from writing one line to cat's stdin until the stdout iterator yields it."""
    line = f"line {i:08d}\n".encode()
    t = time.perf_counter()
    await proc.write_stdin(line)
    got = b""
    while len(got) < len(line):
        got += await anext(proc.stdout)
    elapsed = time.perf_counter() - t
    assert got == line, (got, line)
    return elapsed


async def bench(opts: Options) -> Result:
    result = new_result(
        "streaming", "Started process: line written -> host iterator (TCG guest vs host)", opts
    )
    async with agent_clients("vcb-stream-") as (_, clients):
        procs = {n: await c.start_process(["cat"]) for n, c in clients.items()}

        def candidate(proc: Process) -> Candidate:
            async def run(i: int) -> Sample:
                trips = [await line_trip(proc, i * 100 + k) for k in range(LINES_PER_RUN)]
                trips.sort()
                return {"line_trip": trips[len(trips) // 2], "line_trip_max": trips[-1]}

            return run

        samples = await alternate(
            {n: candidate(p) for n, p in procs.items()}, opts.runs, opts.warmup
        )
        for proc in procs.values():
            await proc.close_stdin()
            await proc.wait()
    add_metrics(result, samples)
    add_ratio(result, "line_trip: guest / host", ("guest", "line_trip"), ("host", "line_trip"))
    add_limit(
        result, "guest line_trip median (streaming delay bound)",
        median(result, "guest", "line_trip"), TARGET,
    )  # fmt: skip
    result["notes"].append(
        f"each sample is the median of {LINES_PER_RUN} lines echoed by cat; the trip "
        "includes the stdin leg, so it bounds the output delay from above"
    )
    result["notes"].append("guest: QEMU q35 TCG, 1 vCPU, 256 MiB; host: the same agent binary")
    return result


if __name__ == "__main__":
    sys.exit(main(bench, __doc__ or ""))
