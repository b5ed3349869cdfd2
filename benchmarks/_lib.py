"""Shared benchmark plumbing: alternating runs, statistics, results, run roots, the CLI.

Every benchmark is `async def bench(opts: Options) -> Result`: it alternates its candidates
(A B, B A, ... after a warm-up), and reports medians, percentiles and ratios measured in the
same run. `main()` runs one benchmark standalone (`--runs N`, `--quick`, `--json PATH`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any

from virtcontainers.drivers.vmm_process import processes_using
from virtcontainers.guest import AGENT_READY_MARKER

MARKER = AGENT_READY_MARKER.encode()
QUICK_RUNS = 2
"""Runs per candidate with `--quick`: enough to exercise every code path, not to conclude."""

Result = dict[str, Any]
Sample = dict[str, float]
Candidate = Callable[[int], Awaitable[Sample]]
"""One measurement of one candidate: run index -> {metric: seconds}."""


class Skip(Exception):
    """A benchmark (or one candidate) cannot run here; the message says why."""


@dataclass(frozen=True)
class Options:
    """How much to measure."""

    runs: int = 10
    warmup: int = 1
    quick: bool = False
    only: tuple[str, ...] = ()
    """`--only`: the candidates to measure (all when empty), for benchmarks that offer it."""

    def scaled(self, factor: int, minimum: int = 1) -> int:
        """`runs * factor` (for cheap measurements that need many samples, e.g. exec)."""
        return max(minimum, self.runs * factor)


# -- statistics -------------------------------------------------------------------------------
def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not samples:
        raise ValueError("percentile of no samples")
    s = sorted(samples)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median, mean, p90, p99, min, max and the raw samples (seconds)."""
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "mean": statistics.fmean(samples),
        "p90": percentile(samples, 90),
        "p99": percentile(samples, 99),
        "min": min(samples),
        "max": max(samples),
        "samples": [round(x, 6) for x in samples],
    }


def fmt_s(seconds: float) -> str:
    """Seconds, or milliseconds below one second."""
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1000:.1f} ms"


def fmt_value(value: float, unit: str = "s") -> str:
    """A metric value in its unit: seconds (`fmt_s`) or bytes (MiB)."""
    return f"{value / (1 << 20):.1f} MiB" if unit == "bytes" else fmt_s(value)


# -- alternation ------------------------------------------------------------------------------
def williams_orders(k: int) -> list[list[int]]:
    """Run orders of k candidates balanced for carry-over (a Williams design): each
    candidate comes first, and follows every other candidate, equally often over a cycle
    (k orders for even k, 2k for odd k; for two: A B, B A)."""
    base: list[int] = []
    lo, hi = 0, k - 1
    for j in range(k):
        if j % 2 == 0:
            base.append(lo)
            lo += 1
        else:
            base.append(hi)
            hi -= 1
    # base = 0, k-1, 1, k-2, ... ; shifted rows make a Latin square
    rows = [[(x + r) % k for x in base] for r in range(k)]
    if k % 2:
        rows += [list(reversed(row)) for row in rows]
    return rows


async def alternate(
    candidates: Mapping[str, Candidate],
    runs: int,
    warmup: int,
    *,
    verbose: bool = True,
    settle: float = 0.0,
) -> dict[str, dict[str, list[float]]]:
    """Run every candidate `warmup` times (discarded), then `runs` times in balanced orders.

    The orders come from `williams_orders`: every candidate goes first, and follows each of
    the others, equally often, so slow drift of the machine and what one candidate leaves
    behind for the next (a VMM still being torn down, caches) hit all candidates alike.
    `runs` is rounded up to whole cycles of orders when it exceeds one cycle. `settle`
    seconds of sleep before each measurement let such background work finish.
    Returns {candidate: {metric: samples}}. `verbose` prints every sample.
    """
    names = list(candidates)
    for w in range(warmup):
        for name in names:
            await asyncio.sleep(settle)
            sample = await candidates[name](-1 - w)
            if verbose:
                print(f"  warm-up {name:16s} {_fmt_sample(sample)}", flush=True)
    orders = williams_orders(len(names))
    if runs > len(orders) and runs % len(orders):
        runs += len(orders) - runs % len(orders)  # whole cycles: balanced
    out: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for i in range(1, runs + 1):
        for idx in orders[(i - 1) % len(orders)]:
            name = names[idx]
            await asyncio.sleep(settle)
            sample = await candidates[name](i)
            for metric, value in sample.items():
                out[name].setdefault(metric, []).append(value)
            if verbose:
                print(f"  run {i:3d} {name:16s} {_fmt_sample(sample)}", flush=True)
    return out


def _fmt_sample(sample: Sample) -> str:
    return "  ".join(f"{m} {fmt_s(v)}" for m, v in sample.items())


# -- results ----------------------------------------------------------------------------------
def new_result(name: str, title: str, opts: Options, **extra: Any) -> Result:
    """An empty result: metrics per candidate, checks (ratios and targets), skips and notes."""
    return {
        "name": name,
        "title": title,
        "runs": opts.runs,
        "warmup": opts.warmup,
        "metrics": {},
        "checks": [],
        "skipped": {},
        "notes": [],
        **extra,
    }


def add_metrics(result: Result, samples: Mapping[str, Mapping[str, list[float]]]) -> None:
    """Summarize {candidate: {metric: samples}} into the result."""
    for cand, metrics in samples.items():
        dest = result["metrics"].setdefault(cand, {})
        for metric, values in metrics.items():
            if values:
                dest[metric] = summarize(list(values))


def median(result: Result, cand: str, metric: str, stat: str = "median") -> float | None:
    """A statistic of one candidate's metric, or None when it was not measured."""
    m = result["metrics"].get(cand, {}).get(metric)
    return float(m[stat]) if m else None


def add_ratio(
    result: Result,
    label: str,
    num: tuple[str, str],
    den: tuple[str, str],
    target: float | None = None,
    stat: str = "median",
) -> None:
    """Record stat(num) / stat(den), both from this run, and whether it is <= target."""
    a, b = median(result, *num, stat=stat), median(result, *den, stat=stat)
    if a is None or b is None or b <= 0:
        return
    value = a / b
    result["checks"].append(
        {
            "label": label,
            "kind": "ratio",
            "value": value,
            "paired": paired_ratio(result, num, den) if stat == "median" else None,
            "target": target,
            "met": None if target is None else value <= target,
        }
    )


def paired_ratio(result: Result, num: tuple[str, str], den: tuple[str, str]) -> float | None:
    """Median of the per-run ratios (run i of one candidate over run i of the other: measured
    back to back, so slow drift of the machine cancels out); None if the runs do not pair."""
    xs = result["metrics"].get(num[0], {}).get(num[1], {}).get("samples")
    ys = result["metrics"].get(den[0], {}).get(den[1], {}).get("samples")
    if not xs or not ys or len(xs) != len(ys) or min(ys) <= 0:
        return None
    return float(statistics.median(x / y for x, y in zip(xs, ys, strict=True)))


def median_difference_ci(
    xs: list[float], ys: list[float], level: float = 0.9, resamples: int = 4000
) -> tuple[float, float]:
    """A bootstrap confidence interval (percentile method) of median(xs) - median(ys): each
    candidate's samples resampled with replacement. It says how finely a difference of
    medians resolves with these samples' spread: a target inside it is neither met nor missed
    by the evidence. Seeded: the same samples give the same interval."""
    if not xs or not ys:
        raise ValueError("median_difference_ci of no samples")
    rng = random.Random(0)
    diffs = sorted(
        statistics.median(rng.choices(xs, k=len(xs)))
        - statistics.median(rng.choices(ys, k=len(ys)))
        for _ in range(resamples)
    )
    tail = (1 - level) / 2 * 100
    return percentile(diffs, tail), percentile(diffs, 100 - tail)


def add_limit(result: Result, label: str, value: float | None, limit: float) -> None:
    """Record an absolute check: value (seconds) <= limit (seconds)."""
    if value is None:
        return
    result["checks"].append(
        {"label": label, "kind": "seconds", "value": value, "target": limit, "met": value <= limit}
    )


def print_result(result: Result) -> None:
    """Human-readable summary: medians (p90/p99), ratios and targets."""
    print(f"\n== {result['title']} ({result['runs']} runs after {result['warmup']} warm-up)")
    unit = result.get("unit", "s")
    for cand, metrics in result["metrics"].items():
        for metric, s in metrics.items():
            med, p90, p99 = (fmt_value(s[k], unit) for k in ("median", "p90", "p99"))
            print(
                f"  {cand:24s} {metric:14s} median {med:>10s}  p90 {p90:>10s}  p99 {p99:>10s}"
                f"  (n={s['n']})"
            )
    for c in result["checks"]:
        value = f"{c['value']:.3f}x" if c["kind"] == "ratio" else fmt_s(c["value"])
        if c.get("paired") is not None:
            value += f" (paired {c['paired']:.3f}x)"
        if c["target"] is None:
            verdict = ""
        else:
            target = f"{c['target']:g}x" if c["kind"] == "ratio" else fmt_s(c["target"])
            verdict = f"  (target <= {target}: {'met' if c['met'] else 'NOT met'})"
        print(f"  {c['label']:52s} {value}{verdict}")
    for what, why in result["skipped"].items():
        print(f"  skipped {what}: {why}")
    for note in result["notes"]:
        print(f"  note: {note}")


# -- run roots and leftovers ------------------------------------------------------------------
async def pool_full(run_root: str, size: int, timeout: float = 300.0) -> None:
    """Until the run root's VM cache server holds `size` ready VMs (a refill is not what a
    benchmark measures)."""
    from virtcontainers.factory import daemon_status

    deadline = time.monotonic() + timeout
    while len((await daemon_status(run_root)).vms) < size:
        if time.monotonic() > deadline:
            raise RuntimeError("the VM cache server's pool did not refill")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def temp_run_root(prefix: str = "vcb-", base: str = "/tmp") -> AsyncIterator[str]:
    """A fresh run root under $VC_BENCH_TMPDIR if set, else under `base` (short: socket
    paths stay under 108 bytes).

    On exit, any process still running from it is killed (reported as a leak) and the
    directory is removed.
    """
    root = tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("VC_BENCH_TMPDIR", base))
    try:
        yield root
    finally:
        leaked = kill_processes_using(root)
        if leaked:
            print(f"  WARNING: killed {len(leaked)} leftover process(es) under {root}: {leaked}")
        shutil.rmtree(root, ignore_errors=True)


def kill_processes_using(path: str) -> list[int]:
    """SIGKILL the processes whose command line names a path inside `path` (only our own
    uniquely named temp directories)."""
    pids = processes_using(path)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


async def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until /proc/<pid> disappears (exited and reaped by its parent)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} still exists after {timeout:g}s")
        await asyncio.sleep(0.002)


# -- commands ---------------------------------------------------------------------------------
def virtc_argv() -> list[str]:
    """The installed `virtc` next to this Python, else `python -m virtcontainers.cli`."""
    script = os.path.join(os.path.dirname(sys.executable), "virtc")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "virtcontainers.cli"]


def run_command(argv: list[str], env: Mapping[str, str]) -> float:
    """Wall time of one command, from spawn to exit; it must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv, env=dict(env), capture_output=True, stdin=subprocess.DEVNULL, check=False
    )
    t = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}"
        )
    return t


def run_virtc(args: list[str], env: Mapping[str, str]) -> float:
    """Wall time of one `virtc` invocation; it must succeed."""
    return run_command([*virtc_argv(), *args], env)


# -- memory -----------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup in bytes (Rss, Pss, Private_Dirty, ...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def vm_memory(pids: list[int]) -> dict[str, int]:
    """smaps_rollup summed over every host process of one VM (the VMM and its helpers, such
    as the console log keeper): what the VM costs the host."""
    total: dict[str, int] = {}
    for pid in pids:
        for key, value in smaps_rollup(pid).items():
            total[key] = total.get(key, 0) + value
    return total


# -- standalone entry point -------------------------------------------------------------------
def parse_options(description: str, argv: list[str] | None = None) -> tuple[Options, str | None]:
    """`--runs N`, `--warmup N`, `--quick`, `--only NAME,...` and `--json PATH`."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--runs", type=int, default=None, help="measured runs per candidate")
    ap.add_argument("--warmup", type=int, default=1, help="discarded runs per candidate")
    ap.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_RUNS} runs")
    ap.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    ap.add_argument("--only", metavar="NAME,...", default="", help="measure only these candidates")
    args = ap.parse_args(argv)
    runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else 10)
    if runs < 1 or args.warmup < 0:
        ap.error("--runs must be >= 1 and --warmup >= 0")
    only = tuple(n for n in args.only.split(",") if n)
    return Options(runs=runs, warmup=args.warmup, quick=args.quick, only=only), args.json


def chosen(opts: Options, known: Sequence[str], *names: str) -> bool:
    """Whether any of `names` is to be measured (all are without `--only`); a name in
    `--only` that is not in `known` (the benchmark's candidates) is refused by name."""
    unknown = [n for n in opts.only if n not in known]
    if unknown:
        die(f"--only: no candidate {', '.join(unknown)} (candidates: {', '.join(known)})")
    return not opts.only or any(n in opts.only for n in names)


def write_bytecode() -> None:
    """Compile the library's modules into their bytecode cache, as an installed package has
    it: commands measured in new interpreters (virtc, the shim binary) would otherwise each
    compile what was edited since, under PYTHONDONTWRITEBYTECODE."""
    import compileall

    import virtcontainers

    compileall.compile_dir(os.path.dirname(virtcontainers.__file__), quiet=1)


def main(bench: Callable[[Options], Coroutine[Any, Any, Result]], description: str) -> int:
    """Run one benchmark from the command line and print (and optionally save) its result."""
    import json

    opts, json_path = parse_options(description)
    write_bytecode()
    try:
        result = asyncio.run(bench(opts))
    except Skip as exc:
        print(f"skipped: {exc}")
        return 0
    print_result(result)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


@contextlib.contextmanager
def timer() -> Iterator[Callable[[], float]]:
    """`with timer() as t: ...; t()` -> seconds since entry (perf_counter)."""
    t0 = time.perf_counter()
    yield lambda: time.perf_counter() - t0


def die(msg: str) -> None:
    print(msg, file=sys.stderr)
    sys.exit(1)
