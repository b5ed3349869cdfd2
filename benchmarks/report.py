"""Render the suite's JSON into docs/benchmarks.md and the boot/clone distribution plot.

`run_all.py` calls `write_docs`; to re-render from a saved JSON:

    .venv/bin/python benchmarks/report.py benchmarks/results/latest.json [--out docs]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any

from _lib import fmt_value

MD_NAME = "benchmarks.md"
PLOT_NAME = "benchmarks-boot.png"
MIB = 1 << 20

#: Candidates of the plot: (benchmark, candidate, metric, label).
BOOT_SERIES = (
    ("cold_boot", "virtcontainers", "boot", "virtcontainers"),
    ("cold_boot", "raw_qemu", "boot", "raw QEMU"),
    ("cold_boot", "libvirt", "boot", "libvirt\n(defaults)"),
    ("cold_boot", "libvirt_same_cmdline", "boot", "libvirt\n(same cmdline)"),
)
ACQUIRE_SERIES = (
    ("template", "cold_boot", "agent_ready", "cold boot"),
    ("template", "clone", "agent_ready", "template\nclone"),
    ("template", "clone_fresh", "agent_ready", "clone +\nfresh identity"),
    ("template", "get_base_vm", "agent_ready", "cache server\nGetBaseVM"),
    ("template", "cache_get_vm", "agent_ready", "cache\nFactory.get_vm"),
)


# -- markdown ---------------------------------------------------------------------------------
def _verdict(check: dict[str, Any]) -> str:
    if check.get("met") is None:
        return "—"
    return "**met**" if check["met"] else "**not met**"


def _check_value(check: dict[str, Any]) -> str:
    if check["kind"] != "ratio":
        return fmt_value(check["value"])
    paired = check.get("paired")
    return f"{check['value']:.3f}x" + (f" ({paired:.3f}x)" if paired is not None else "")


def _check_target(check: dict[str, Any]) -> str:
    if check.get("target") is None:
        return "—"
    t = check["target"]
    return f"<= {t:g}x" if check["kind"] == "ratio" else f"<= {fmt_value(t)}"


def _machine_section(m: dict[str, Any]) -> list[str]:
    accel = m.get("accelerator", "?").upper()
    rows = [
        ("CPU", f"{m.get('cpu_model')} ({m.get('cpus')} CPUs, shared with other work)"),
        ("Memory", f"{m.get('memory_bytes', 0) / (1 << 30):.1f} GiB"),
        ("OS / kernel", f"{m.get('os')} / {m.get('kernel')}"),
        ("QEMU", m.get("qemu", "?")),
        ("libvirt", m.get("libvirt", "not measured")),
        ("Accelerator", accel),
        ("Python / virtcontainers", f"{m.get('python')} / {m.get('virtcontainers')}"),
        ("Commit", m.get("git_commit", "?")),
        (
            "Load average (1/5/15 min)",
            f"{_load(m.get('load_average_start'))} at the start, "
            f"{_load(m.get('load_average'))} at the end",
        ),
    ]
    out = ["## Machine", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += [
        "",
        f"**Why {accel}:** "
        + (
            "KVM runs guests here."
            if m.get("accelerator") == "kvm"
            else "`/dev/kvm` exists on this machine (itself a VM"
            + (", the CPU flags say so" if m.get("running_on_vmm") else "")
            + ") but cannot run an ordinary guest: virtcontainers' KVM probe reports "
            f"\"{m.get('accelerator_reason', '')}\". Every VM here, virtcontainers', raw QEMU's "
            "and libvirt's alike, runs under TCG (QEMU's instruction emulator), so absolute "
            "boot times are several times what a KVM host shows; the ratios between "
            "candidates measured in the same run are the meaningful numbers."
        ),
        "",
    ]
    return out


def _load(values: Any) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "?"


def _summary_section(benchmarks: dict[str, Any]) -> list[str]:
    out = [
        "## Targets and ratios",
        "",
        "Every ratio compares medians of candidates measured in the same run, alternated; "
        "in brackets, the median of the per-run ratios (run i of one candidate over run i of "
        "the other, measured back to back), which is less sensitive to the machine's load "
        "drifting during the run. Targets are checked on the ratio of medians.",
        "",
        "| benchmark | measured | comparison | value | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in benchmarks.items():
        when = _run_short(res)
        for c in res.get("checks", []):
            out.append(
                f"| {name} | {when} | {c['label']} | {_check_value(c)} | "
                f"{_check_target(c)} | {_verdict(c)} |"
            )
        for what, why in res.get("skipped", {}).items():
            out.append(f"| {name} | {when} | {what} | skipped | — | {why} |")
        if res.get("error"):
            out.append(f"| {name} | {when} | — | failed | — | see the section below |")
    out.append("")
    return out


def _run_short(res: dict[str, Any]) -> str:
    """'date, commit' of the run that measured this benchmark ('—' when not recorded)."""
    run = res.get("run")
    if not run:
        return "—"
    commit = str(run.get("git_commit") or "?").split()[0]
    return f"{run.get('generated_at')}, {commit}"


def _runs_paragraph(data: dict[str, Any]) -> list[str]:
    """When the JSON merges several runs: which benchmarks come from which."""
    groups: dict[str, list[str]] = {}
    for name, res in data.get("benchmarks", {}).items():
        run = res.get("run") or {}
        key = (
            f"{run.get('generated_at')} at commit {run.get('git_commit')} "
            f"(`--runs {run.get('options', {}).get('runs')}`)"
        )
        groups.setdefault(key, []).append(f"`{name}`")
    if len(groups) < 2:
        return []
    lines = [f"- {', '.join(names)}: measured on {key}" for key, names in groups.items()]
    return [
        "This report merges runs (`run_all.py --merge`): only some benchmarks were rerun; "
        "the others are kept from an earlier run, and ratios are only ever taken within one "
        "run.",
        "",
        *lines,
        "",
    ]


def _description(res: dict[str, Any]) -> list[str]:
    """The benchmark's docstring as markdown paragraphs (indented blocks as code)."""
    text = res.get("description", "").strip("\n")
    out = []
    for p in text.split("\n\n"):
        if not p.strip() or ".venv/bin/python" in p:
            continue
        lines = p.split("\n")
        if all(ln.startswith("    ") for ln in lines if ln.strip()):
            out.append("```\n" + textwrap.dedent(p) + "\n```")
        elif p.lstrip().startswith("-"):
            out.append(p.strip("\n"))
        else:
            out.append(" ".join(ln.strip() for ln in lines))
    return out


def _benchmark_section(name: str, res: dict[str, Any]) -> list[str]:
    out = [f"## {res.get('title', name)}", ""]
    for p in _description(res):
        out += [p, ""]
    if res.get("error"):
        out += ["**Failed:**", "", "```", res["error"].strip()[-3000:], "```", ""]
        return out
    if res.get("skipped_all"):
        out += [f"Skipped: {res['skipped_all']}", ""]
        return out
    unit = res.get("unit", "s")
    if res.get("n_vms"):
        runs = f"{res['n_vms']} VMs of each kind running at once"
    else:
        runs = (
            f"{res.get('warmup')} warm-up run(s) per candidate, then n measured runs each "
            "(alternated; n is rounded up to whole cycles of the balanced orders)"
        )
    measured = ""
    if res.get("run"):
        run = res["run"]
        measured = (
            f" Measured on {run.get('generated_at')} at commit {run.get('git_commit')} "
            f"(`--runs {run.get('options', {}).get('runs')}`)."
        )
    out += [
        f"{runs} ({res.get('elapsed_s', 0):.0f} s).{measured}",
        "",
        "| candidate | metric | median | p90 | p99 | min | max | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = res.get("labels", {})
    for key, metrics in res.get("metrics", {}).items():
        cand = labels.get(key, key)
        for metric, s in metrics.items():
            vals = " | ".join(fmt_value(s[k], unit) for k in ("median", "p90", "p99", "min", "max"))
            out.append(f"| {cand} | {metric} | {vals} | {s['n']} |")
    out.append("")
    checks = res.get("checks", [])
    if checks:
        out += ["| comparison | value | target | result |", "|---|---|---|---|"]
        out += [
            f"| {c['label']} | {_check_value(c)} | {_check_target(c)} | {_verdict(c)} |"
            for c in checks
        ]
        out.append("")
    for what, why in res.get("skipped", {}).items():
        out += [f"- Skipped {what}: {why}"]
    for note in res.get("notes", []):
        out += [f"- {note}"]
    if res.get("skipped") or res.get("notes"):
        out.append("")
    return out


def _libvirt_boot_lines(med: Any) -> list[str]:
    """Cold boot against both libvirt domains: what the defaults cost, what launch costs."""
    vc = med("cold_boot", "virtcontainers", "boot")
    lvd = med("cold_boot", "libvirt", "boot")
    lvs = med("cold_boot", "libvirt_same_cmdline", "boot")
    if vc is None or lvd is None or lvs is None:
        return []
    ratio = vc / lvd
    verdict = "met" if ratio <= 0.8 else "NOT met"
    return [
        f'- Cold boot against libvirt: the target "<= 0.8x libvirt" is checked against '
        f"`libvirt (defaults)`, the domain a libvirt user writes for this kernel (the bzImage "
        f"as packaged, libvirt's default devices and CPU model, command line "
        f"`console=ttyS0`): virtcontainers {fmt_value(vc)} vs {fmt_value(lvd)}, "
        f"**{ratio:.3f}x: target {verdict}**. `libvirt (same cmdline)`, a lean domain given "
        f"virtcontainers' own guest (the ELF vmlinux booted through its PVH entry, so no "
        f"decompression in the guest, and the tuned command line), boots in {fmt_value(lvs)}, "
        f"so of the {(lvd - vc) * 1000:+.0f} ms between libvirt's defaults and "
        f"virtcontainers, {(lvd - lvs) * 1000:+.0f} ms ({lvs / lvd:.3f}x) is the guest "
        f"configuration (PVH vmlinux, Kata's fast-boot parameters, `quiet`, no "
        f"USB/SATA/balloon, -cpu max) — what libvirt gets too when given the same guest — "
        f"and {(lvs - vc) * 1000:+.0f} ms ({vc / lvs:.3f}x) is launch overhead (libvirt's "
        "domain set-up before QEMU runs the guest vs the driver's)."
    ]


def _overhead_section(benchmarks: dict[str, Any]) -> list[str]:
    """Where virtcontainers' time goes, from the breakdown metrics of this run."""

    def med(bench: str, cand: str, metric: str) -> float | None:
        m = benchmarks.get(bench, {}).get("metrics", {}).get(cand, {}).get(metric)
        return float(m["median"]) if m else None

    lines: list[str] = []
    vc, raw = med("cold_boot", "virtcontainers", "boot"), med("cold_boot", "raw_qemu", "boot")
    create = med("cold_boot", "virtcontainers", "create")
    vl, rl = med("cold_boot", "virtcontainers", "launch"), med("cold_boot", "raw_qemu", "launch")
    if None not in (vc, raw, create, vl, rl):
        assert vc is not None and raw is not None and create is not None
        assert vl is not None and rl is not None
        lines.append(
            f"- Cold boot: virtcontainers {fmt_value(vc)} vs raw QEMU {fmt_value(raw)} "
            f"(difference {(vc - raw) * 1000:+.0f} ms). Before QEMU starts the driver spends "
            f"{fmt_value(create)} (`create_sandbox`: config validation, VM directory, argv, "
            f"agent port); until QMP is connected {fmt_value(vl)} vs {fmt_value(rl)} for raw "
            "QEMU's greeting. The rest is the guest booting, the same for both: differences "
            "of this size are within the run-to-run spread of a TCG boot on a shared 2-CPU "
            "machine (see p90)."
        )
    lines += _libvirt_boot_lines(med)
    sb = med("lifecycle", "virtcontainers", "pause_pause_resume")
    drv = med("lifecycle", "qemu_driver", "pause_pause_resume")
    lv = med("lifecycle", "libvirt", "pause_pause_resume")
    lvs_p = med("lifecycle", "libvirt_same_cmdline", "pause_pause_resume")
    tmpfs = med("lifecycle", "virtcontainers_tmpfs", "pause_pause_resume")
    fs = benchmarks.get("lifecycle", {}).get("run_root_fs", {})
    if sb is not None and drv is not None:
        lines.append(
            f"- Pause + resume: the Sandbox takes {fmt_value(sb)} (run root on "
            f"{fs.get('virtcontainers', '?')}), its QEMU driver alone {fmt_value(drv)}"
            + (
                f", libvirt {fmt_value(lv)} (defaults) and {fmt_value(lvs_p)} (same cmdline)"
                if lv is not None and lvs_p is not None
                else ""
            )
            + ". Both send QEMU the same QMP `stop`/`cont`; the Sandbox adds its flock and "
            "records the pause state as one byte written in place (the state document is "
            "rewritten only when more than that changes), which another process reads when "
            "it attaches or lists."
            + (
                f" With the run root on a tmpfs the Sandbox takes {fmt_value(tmpfs)}."
                if tmpfs is not None
                else ""
            )
        )
    for metric, what, call, seen in (
        ("block_visible", "Block hotplug", "`Sandbox.add_disk`", "has its /dev node"),
        ("vcpu_online", "vCPU hotplug", "`Sandbox.resize`", "has the vCPU online"),
    ):
        sb_t = med("lifecycle", "virtcontainers", metric)
        drv_t = med("lifecycle", "qemu_driver", metric)
        lv_t = med("lifecycle", "libvirt", metric)
        lvs_t = med("lifecycle", "libvirt_same_cmdline", metric)
        attach = metric.split("_")[0] + "_attach"
        drv_a = med("lifecycle", "qemu_driver", attach)
        lvs_a = med("lifecycle", "libvirt_same_cmdline", attach)
        if None in (sb_t, drv_t, lv_t, lvs_t, drv_a, lvs_a):
            continue
        assert sb_t is not None and drv_t is not None and lv_t is not None
        assert lvs_t is not None and drv_a is not None and lvs_a is not None
        lines.append(
            f"- {what} until the guest {seen}: Sandbox {fmt_value(sb_t)}, QEMU driver alone "
            f"{fmt_value(drv_t)}, libvirt {fmt_value(lv_t)} (defaults) and "
            f"{fmt_value(lvs_t)} (same cmdline). The API calls alone: driver "
            f"{fmt_value(drv_a)}, libvirt {fmt_value(lvs_a)}; the rest is the guest's own "
            f"work, which dominates under TCG. {call} sends the guest agent's wait (answered "
            "on the guest kernel's uevents) before the hotplug and returns when it answers; "
            "for the driver and libvirt the benchmark sends the same wait before their call."
        )
    if not lines:
        return []
    return ["## Where virtcontainers' time goes", "", *lines, ""]


def render(data: dict[str, Any]) -> str:
    """docs/benchmarks.md for one run of the suite."""
    opts = data.get("options", {})
    benchmarks: dict[str, Any] = data.get("benchmarks", {})
    out = [
        "# Benchmarks",
        "",
        f"Generated by `benchmarks/run_all.py` (`make bench`) on {data.get('generated_at')} "
        f"(`--runs {opts.get('runs')}`"
        + (", `--quick`: a smoke test, too few runs to conclude" if opts.get("quick") else "")
        + "; each table's n column gives the runs actually measured). Do not edit: rerun the "
        "suite. Raw samples: `benchmarks/results/latest.json`.",
        "",
        "Method: every benchmark alternates its candidates after a discarded warm-up, in "
        "orders balanced for carry-over (a Williams design: A B, B A for two; all six orders "
        "of three; four orders of four; each candidate goes first, and follows each other "
        "one, equally often), reports medians with p90/p99, and compares candidates only "
        "within the same run, never against numbers from another run.",
        "",
    ]
    out += _runs_paragraph(data)
    out += _machine_section(data.get("machine", {}))
    out += _summary_section(benchmarks)
    out += _overhead_section(benchmarks)
    if any(_series(benchmarks, BOOT_SERIES + ACQUIRE_SERIES)):
        out += [f"![Boot and clone time distributions]({PLOT_NAME})", ""]
    for name, res in benchmarks.items():
        out += _benchmark_section(name, res)
    return "\n".join(out).rstrip() + "\n"


# -- plot -------------------------------------------------------------------------------------
def _series(
    benchmarks: dict[str, Any], spec: tuple[tuple[str, str, str, str], ...]
) -> list[tuple[str, list[float]]]:
    out = []
    for bench, cand, metric, label in spec:
        m = benchmarks.get(bench, {}).get("metrics", {}).get(cand, {}).get(metric)
        if m and m.get("samples"):
            out.append((label, [float(x) for x in m["samples"]]))
    return out


def _other_run(data: dict[str, Any], bench: str) -> str:
    """'\n(run of DATE)' when `bench` was measured by another run than the suite's."""
    run = data.get("benchmarks", {}).get(bench, {}).get("run") or {}
    when = run.get("generated_at")
    return f"\n(run of {when})" if when and when != data.get("generated_at") else ""


def plot(data: dict[str, Any], path: str) -> bool:
    """Box plots (with every sample) of cold boot times and of VM acquisition times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = data.get("benchmarks", {})
    boot, acquire = _series(benchmarks, BOOT_SERIES), _series(benchmarks, ACQUIRE_SERIES)
    panels = [p for p in (boot, acquire) if p]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    titles = {
        id(boot): "Cold boot to agent-ready (s)" + _other_run(data, "cold_boot"),
        id(acquire): "VM with a ready agent, by strategy (ms, log scale)"
        + _other_run(data, "template"),
    }
    for ax, series in zip(axes[0], panels, strict=True):
        labels = [s[0] for s in series]
        scale = 1000.0 if series is acquire else 1.0
        values = [[v * scale for v in s[1]] for s in series]
        ax.boxplot(values, showfliers=False)
        for i, vs in enumerate(values, start=1):
            xs = [i + (j % 7 - 3) * 0.03 for j in range(len(vs))]
            ax.scatter(xs, vs, s=10, alpha=0.6)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.set_title(titles[id(series)])
        if series is acquire:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    m = data.get("machine", {})
    fig.suptitle(
        f"{m.get('accelerator', '?').upper()} on {m.get('cpu_model', '?')} "
        f"({m.get('cpus', '?')} CPUs), {data.get('generated_at', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_docs(data: dict[str, Any], md_path: str, png_path: str) -> None:
    """Write the markdown report and the plot."""
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    has_plot = plot(data, png_path)
    text = render(data)
    if not has_plot:
        text = text.replace(f"![Boot and clone time distributions]({PLOT_NAME})\n\n", "")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)


def main() -> int:
    ap = argparse.ArgumentParser(description="Render benchmark JSON into markdown and a plot.")
    ap.add_argument("json_path")
    ap.add_argument("--out", default=None, help="directory for the .md and .png (default docs/)")
    args = ap.parse_args()
    with open(args.json_path, encoding="utf-8") as f:
        data = json.load(f)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
    write_docs(data, os.path.join(out, MD_NAME), os.path.join(out, PLOT_NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
