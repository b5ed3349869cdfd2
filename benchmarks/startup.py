"""`virtc` start-up: --version, --help, list and exec against the bare interpreter, same run.

Every `virtc` command is a new process: Python starts, imports what the command needs, parses
its arguments and does its work. Candidates, alternated: the virtual environment's
interpreter running `python -c pass` (the floor every command pays), `virtc --version`,
`virtc --help`, `virtc list` (one running sandbox listed, its VMM's liveness checked) and
`virtc exec ID -- true` into that running sandbox (q35, 256 MiB, TCG). Against the exec, in
this process: `Sandbox.attach(ID)`, `exec(["true"])`, `detach()`, what the command does once
started, so the difference is the CLI's own cost (interpreter, imports, parsing). The
commands run with the bytecode cache written (as an installed package has it), after a
discarded warm-up.

Targets: --version <= 3x, --help <= 6x, list <= 8x the bare interpreter; the CLI's own cost
of exec <= 0.1 s.

    .venv/bin/python benchmarks/startup.py [--runs 10] [--quick]
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
    fmt_s,
    main,
    median,
    new_result,
    run_command,
    run_virtc,
    temp_run_root,
)

from virtcontainers.sandbox import Sandbox

TITLE = "`virtc` start-up: --version, --help, list and exec vs `python -c pass`"
SANDBOX_ID = "startup"
RUNS_PER_RUN = 3
"""Samples of each candidate per run of the suite (`--runs 10` -> 30): they are short."""
TARGETS = {"virtc_version": 3.0, "virtc_help": 6.0, "virtc_list": 8.0}
EXEC_CLI_COST_TARGET = 0.1
LABELS = {
    "python_pass": "python -c pass",
    "virtc_version": "virtc --version",
    "virtc_help": "virtc --help",
    "virtc_list": "virtc list",
    "virtc_exec": "virtc exec ID -- true",
    "attach_exec": "in-process attach + exec + detach",
}


def command_env(run_root: str) -> dict[str, str]:
    """The environment of the measured commands: the bytecode cache in use, as installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "VC_RUN_ROOT": run_root}


async def measure(opts: Options, run_root: str) -> dict[str, dict[str, list[float]]]:
    env = command_env(run_root)

    async def python_pass(_i: int) -> Sample:
        return {"wall": await asyncio.to_thread(run_command, [sys.executable, "-c", "pass"], env)}

    def virtc(*args: str) -> Candidate:
        async def run(_i: int) -> Sample:
            return {"wall": await asyncio.to_thread(run_virtc, list(args), env)}

        return run

    async def attach_exec(_i: int) -> Sample:
        t0 = time.perf_counter()
        sb = await Sandbox.attach(SANDBOX_ID, run_root=run_root)
        try:
            res = await sb.exec(["true"])
        finally:
            await sb.detach()
        t = time.perf_counter() - t0
        if res.exit_code != 0:
            raise RuntimeError(f"true exited {res.exit_code} in the guest")
        return {"wall": t}

    cands: dict[str, Candidate] = {
        "python_pass": python_pass,
        "virtc_version": virtc("--version"),
        "virtc_help": virtc("--help"),
        "virtc_list": virtc("list"),
        "virtc_exec": virtc("exec", SANDBOX_ID, "--", "true"),
        "attach_exec": attach_exec,
    }
    runs = opts.scaled(RUNS_PER_RUN)
    print(f"start-up: {runs} runs of each after {max(1, opts.warmup)} warm-up", flush=True)
    return await alternate(cands, runs, max(1, opts.warmup), verbose=False)


async def bench(opts: Options) -> Result:
    result = new_result("startup", TITLE, opts, unit="s", labels=LABELS)
    async with temp_run_root() as run_root:
        sb = Sandbox(SANDBOX_ID, run_root=run_root, memory_size=256)
        await sb.start()
        try:
            await sb.detach()  # the agent's one connection is free for the candidates
            samples = await measure(opts, run_root)
        finally:
            sb = await Sandbox.attach(SANDBOX_ID, run_root=run_root)
            await sb.stop()
    add_metrics(result, samples)
    for cand, target in TARGETS.items():
        add_ratio(
            result, f"{LABELS[cand]} / python -c pass", (cand, "wall"), ("python_pass", "wall"),
            target,
        )  # fmt: skip
    add_ratio(
        result, "virtc exec / in-process attach + exec + detach", ("virtc_exec", "wall"),
        ("attach_exec", "wall"),
    )  # fmt: skip
    add_ratio(
        result, "virtc exec / python -c pass", ("virtc_exec", "wall"), ("python_pass", "wall"),
    )  # fmt: skip
    ve, ae = median(result, "virtc_exec", "wall"), median(result, "attach_exec", "wall")
    pp = median(result, "python_pass", "wall")
    if ve is not None and ae is not None and pp is not None:
        add_limit(result, "virtc exec: CLI's own cost (difference of medians)", ve - ae,
                  EXEC_CLI_COST_TARGET)  # fmt: skip
        result["notes"].append(
            f"virtc exec's own cost is {(ve - ae) / pp:.1f} times this run's python -c pass "
            f"({fmt_s(pp)}): the absolute figure scales with the machine's load"
        )
    return result


if __name__ == "__main__":
    sys.exit(main(bench, __doc__.splitlines()[0]))
