"""Run the whole benchmark suite; write the JSON, docs/benchmarks.md and the boot/clone plot.

    .venv/bin/python benchmarks/run_all.py [--runs 10] [--quick] [--only a,b] [--out DIR]

Without `--out`: benchmarks/results/latest.json, docs/benchmarks.md, docs/benchmarks-boot.png.
With `--out DIR`: all three in DIR (the smoke test uses a temporary directory).
With `--merge`: the benchmarks not run this time are kept from the JSON already there, each
marked with the date and commit of the run that measured it.
The exit code is 1 when a benchmark failed (its error is in the JSON and the report).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import os
import sys
import time
import traceback
from typing import Any

import report
from _lib import QUICK_RUNS, Options, Result, Skip, print_result, write_bytecode
from _machine import machine_info

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(HERE, "..", "docs")
RESULTS = os.path.join(HERE, "results")

#: Suite order: name -> (module in benchmarks/ with `async def bench(opts, **kw) -> dict`, kw).
BENCHMARKS: dict[str, tuple[str, dict[str, Any]]] = {
    "cold_boot": ("cold_boot", {}),
    "lifecycle": ("lifecycle", {}),
    # Template clone, GetBaseVM (cache server) and cache get_vm vs cold boot; its memory
    # comparison (n > 0) is left to density.py, which also extrapolates to 24 GiB.
    "template": ("template", {"n": 0}),
    "exec": ("exec", {}),
    "images": ("images", {}),
    "exec_agent": ("exec_agent", {}),
    "streaming": ("streaming", {}),
    "startup": ("startup", {}),
    "density": ("density", {}),
    "network": ("network", {}),
    "shim": ("shim", {}),
}
NOTES = {"template": "run_all runs it with --n 0: the memory comparison is in `density`"}


def run_one(name: str, opts: Options) -> Result:
    """Run one benchmark in a fresh event loop; failures become an `error` entry."""
    module_name, kwargs = BENCHMARKS[name]
    print(f"\n### {name}", flush=True)
    t0 = time.perf_counter()
    doc = ""
    try:
        module = importlib.import_module(module_name)
        doc = module.__doc__ or ""
        print(doc.splitlines()[0] if doc else name, flush=True)
        result: Result = asyncio.run(module.bench(opts, **kwargs))
        print_result(result)
    except Skip as exc:
        result = {"name": name, "skipped_all": str(exc)}
        print(f"skipped: {exc}")
    except Exception:
        result = {"name": name, "error": traceback.format_exc()}
        print(f"FAILED:\n{result['error']}", file=sys.stderr)
    result["description"] = doc
    if name in NOTES:
        result.setdefault("notes", []).append(NOTES[name])
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def run_info(data: dict[str, Any]) -> dict[str, Any]:
    """When and at which commit a suite's JSON was measured (per benchmark once merged)."""
    return {
        "generated_at": data.get("generated_at"),
        "git_commit": data.get("machine", {}).get("git_commit"),
        "options": data.get("options", {}),
    }


def merge(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """`new` plus the benchmarks of `old` it did not run (in suite order), every benchmark
    marked with the run that measured it (`run`: date, commit, options)."""
    for res in new["benchmarks"].values():
        res.setdefault("run", run_info(new))
    kept = {
        name: {"run": run_info(old), **res}
        for name, res in old.get("benchmarks", {}).items()
        if name not in new["benchmarks"]
    }
    merged = {**kept, **new["benchmarks"]}
    order = [n for n in BENCHMARKS if n in merged] + [n for n in merged if n not in BENCHMARKS]
    return {**new, "benchmarks": {n: merged[n] for n in order}}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="measured runs per candidate")
    ap.add_argument("--warmup", type=int, default=1, help="discarded runs per candidate")
    ap.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_RUNS} runs each")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--out", default=None, help="write the JSON, report and plot here")
    ap.add_argument(
        "--merge", action="store_true", help="keep the other benchmarks of the existing JSON"
    )
    args = ap.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    args.names = only or list(BENCHMARKS)
    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else 10
    if args.runs < 1 or args.warmup < 0:
        ap.error("--runs must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    opts = Options(runs=args.runs, warmup=args.warmup, quick=args.quick)
    load_start = list(os.getloadavg())
    started = datetime.datetime.now(datetime.UTC)
    machine = machine_info()  # before the run: the commit and tree state of the code measured
    write_bytecode()
    results: dict[str, Any] = {name: run_one(name, opts) for name in args.names}
    machine["load_average_start"] = load_start
    machine["load_average"] = list(os.getloadavg())  # at the end
    for res in results.values():
        if res.get("libvirt_version"):
            machine["libvirt"] = res["libvirt_version"]
    data = {
        "generated_at": started.strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1),
        "options": {"runs": opts.runs, "warmup": opts.warmup, "quick": opts.quick},
        "machine": machine,
        "benchmarks": results,
    }
    if args.out:
        json_path = os.path.join(args.out, "latest.json")
        md_path = os.path.join(args.out, report.MD_NAME)
        png_path = os.path.join(args.out, report.PLOT_NAME)
    else:
        json_path = os.path.join(RESULTS, "latest.json")
        md_path = os.path.join(DOCS, report.MD_NAME)
        png_path = os.path.join(DOCS, report.PLOT_NAME)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    if args.merge and os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as f:
            data = merge(data, json.load(f))
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    report.write_docs(data, md_path, png_path)
    print(f"\nwrote {json_path}, {md_path}, {png_path} ({data['elapsed_s']:.0f} s)")
    return 1 if any(r.get("error") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
