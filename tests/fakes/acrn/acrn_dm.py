"""A fake `acrn-dm`: parses and validates the real flag syntax, records itself, waits for SIGINT.

Run as `python -m tests.fakes.acrn.acrn_dm [acrn-dm flags] <vmname>`. It checks what the real
device model would refuse (slot syntax and clashes, hostbridge at 0:0, `-l com1` without an LPC
device, unknown emulations, missing kernel/ramdisk/disk files, bad memory size, UUID, MAC or tap
syntax), then writes `$FAKE_ACRN_DIR/<vmname>.json` (pid, argv, uuid, slots) for tests and for
the fake acrnctl and binds the virtio-console sockets. SIGINT ends it cleanly (exit 0).

Faults (env): FAKE_ACRN_HANG=1 never gets ready (no console socket); FAKE_ACRN_IGNORE_SIGINT=1
survives SIGINT (only SIGKILL ends it); FAKE_ACRN_CRASH_AFTER=SECONDS dies (exit 139) that
long after start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any, NoReturn

EMULATIONS = {
    "hostbridge",
    "lpc",
    "virtio-blk",
    "virtio-net",
    "virtio-console",
    "virtio-rnd",
    "vhost-vsock",
    "passthru",
    "virtio-hyper_dmabuf",
}
_SLOT_RE = re.compile(r"^(\d+)(?::(\d))?$")
_MEM_RE = re.compile(r"^(\d+)([KkMmGg]?)$")
_PORT_RE = re.compile(r"^(@?)(stdio|tty|pty|file|socket):([A-Za-z0-9_.-]+)(?:=([^,:]+))?$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_IF_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")


def fail(msg: str) -> NoReturn:
    """Exit like acrn-dm does on a bad command line."""
    sys.stderr.write(f"acrn-dm: {msg}\n")
    sys.stderr.flush()
    sys.exit(1)


def record_dir() -> str:
    """Where records go: $FAKE_ACRN_DIR (required)."""
    d = os.environ.get("FAKE_ACRN_DIR", "")
    if not d or not os.path.isdir(d):
        fail(f"FAKE_ACRN_DIR={d!r} is not a directory (the fake needs it)")
    return d


def write_record(path: str, doc: dict[str, Any]) -> None:
    """Atomically replace a JSON record."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def parse_slot(value: str, slots: dict[str, dict[str, str]]) -> None:
    """One `-s slot[:func],emul[,conf]` option, checked like acrn-dm's pci_parse_slot."""
    parts = value.split(",", 2)
    if len(parts) < 2:
        fail(f'invalid PCI slot info field "{value}"')
    m = _SLOT_RE.match(parts[0])
    if not m:
        fail(f'invalid PCI slot "{parts[0]}"')
    slot, func = int(m.group(1)), int(m.group(2) or 0)
    if slot > 31:
        fail(f"invalid PCI slot {slot} (0..31)")
    key = f"{slot}:{func}"
    if key in slots:
        fail(f"PCI slot {key} is already in use")
    emul, conf = parts[1], parts[2] if len(parts) > 2 else ""
    if emul not in EMULATIONS:
        fail(f'unknown PCI emulation "{emul}"')
    if emul == "hostbridge" and key != "0:0":
        fail("hostbridge must be at slot 0:0")
    if emul == "virtio-blk":
        path, _, blk_opts = conf.partition(",")
        if not path:
            fail(f"virtio-blk at slot {key}: no backing file")
        if path != "nodisk" and not os.path.exists(path):
            fail(f"virtio-blk at slot {key}: cannot open {path}")
        if blk_opts and blk_opts not in ("ro",):
            fail(f"virtio-blk at slot {key}: unknown option {blk_opts!r}")
    elif emul == "virtio-net":
        opts: dict[str, str] = {}
        for o in conf.split(","):
            k, _, v = o.partition("=")
            opts[k] = v
        if not _IF_RE.match(opts.get("tap", "")):
            fail(f"virtio-net at slot {key}: bad tap= in {conf!r}")
        if "mac" in opts and not _MAC_RE.match(opts["mac"]):
            fail(f"virtio-net at slot {key}: bad MAC {opts['mac']!r}")
        if set(opts) - {"tap", "mac"}:
            fail(f"virtio-net at slot {key}: unknown options in {conf!r}")
    elif emul == "virtio-console":
        for port in conf.split(","):
            pm = _PORT_RE.match(port)
            if not pm:
                fail(f"virtio-console at slot {key}: bad port {port!r}")
            if pm.group(2) in ("socket", "file", "tty") and not pm.group(4):
                fail(f"virtio-console at slot {key}: port {port!r} needs a path")
    slots[key] = {"emul": emul, "conf": conf, "current": conf.partition(",")[0]}


def parse(argv: list[str]) -> dict[str, Any]:
    """The validated command line as a record."""
    p = argparse.ArgumentParser(prog="acrn-dm", add_help=False)
    p.add_argument("-A", "--acpi", action="store_true")
    p.add_argument("-m", "--memsize", required=True)
    p.add_argument("-s", "--pci_slot", action="append", default=[])
    p.add_argument("-l", "--lpc", action="append", default=[])
    p.add_argument("-k", "--kernel")
    p.add_argument("-r", "--ramdisk")
    p.add_argument("-B", "--bootargs", default="")
    p.add_argument("-U", "--uuid")
    p.add_argument("--cpu_affinity")
    p.add_argument("-W", "--virtio_msix", action="store_true")
    p.add_argument("--debugexit", action="store_true")
    p.add_argument("vmname")
    try:
        opts = p.parse_args(argv)
    except SystemExit:
        fail(f"bad command line: {argv}")
    if not _MEM_RE.match(opts.memsize):
        fail(f'invalid memsize "{opts.memsize}"')
    if opts.uuid is not None:
        try:
            uuid.UUID(opts.uuid)
        except ValueError:
            fail(f'invalid uuid "{opts.uuid}"')
    if opts.cpu_affinity is not None and not re.match(r"^\d+(,\d+)*$", opts.cpu_affinity):
        fail(f'invalid cpu_affinity "{opts.cpu_affinity}"')
    if not _NAME_RE.match(opts.vmname):
        fail(f'invalid vm name "{opts.vmname}"')
    for key in ("kernel", "ramdisk"):
        path = getattr(opts, key)
        if path is not None and not os.path.isfile(path):
            fail(f"cannot open {key} {path}")
    slots: dict[str, dict[str, str]] = {}
    for s in opts.pci_slot:
        parse_slot(s, slots)
    if "0:0" not in slots:
        fail("no hostbridge at slot 0:0")
    for lpc in opts.lpc:
        name, _, backend = lpc.partition(",")
        if name not in ("com1", "com2") or not backend:
            fail(f'invalid lpc device "{lpc}"')
        if not any(v["emul"] == "lpc" for v in slots.values()):
            fail(f"{name} needs an lpc device")
    return {
        "pid": os.getpid(),
        "argv": argv,
        "name": opts.vmname,
        "uuid": opts.uuid,
        "memsize": opts.memsize,
        "cpu_affinity": opts.cpu_affinity,
        "kernel": opts.kernel,
        "ramdisk": opts.ramdisk,
        "bootargs": opts.bootargs,
        "slots": slots,
        "exited": False,
    }


def main(argv: list[str] | None = None) -> int:
    """Validate, record, bind console sockets, then idle until SIGINT. The record comes first:
    the driver takes a bound console socket for a started VM, and tests read the record then."""
    args = list(sys.argv[1:] if argv is None else argv)
    rec_dir = record_dir()
    rec = parse(args)
    path = os.path.join(rec_dir, f"{rec['name']}.json")
    stop = threading.Event()
    if os.environ.get("FAKE_ACRN_IGNORE_SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    write_record(path, rec)
    listeners: list[tuple[socket.socket, str]] = []
    if not os.environ.get("FAKE_ACRN_HANG"):
        for info in rec["slots"].values():
            if info["emul"] != "virtio-console":
                continue
            for port in info["conf"].split(","):
                pm = _PORT_RE.match(port)
                if pm and pm.group(2) == "socket":
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        sock.bind(pm.group(4))
                    except OSError as e:
                        fail(f"virtio-console: cannot bind {pm.group(4)}: {e}")
                    sock.listen(1)
                    listeners.append((sock, pm.group(4)))
    print(f"acrn-dm (fake): VM {rec['name']} running, pid {os.getpid()}", flush=True)
    crash_after = float(os.environ.get("FAKE_ACRN_CRASH_AFTER") or 0)
    if crash_after:
        time.sleep(crash_after)
        sys.stderr.write("acrn-dm: segmentation fault (injected)\n")
        sys.stderr.flush()
        os._exit(139)
    while not stop.wait(0.1):
        pass
    for sock, spath in listeners:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(spath)
    rec["exited"] = True
    write_record(path, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
