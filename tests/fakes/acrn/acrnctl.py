"""A fake `acrnctl`: `blkrescan <vm> <slot>,<path|nodisk>` against a running fake acrn-dm.

The VM is found through the fake acrn-dm's record in $FAKE_ACRN_DIR; each accepted call is
appended to `$FAKE_ACRN_DIR/acrnctl.log` (JSON lines). Refused, with exit code 1: an unknown or
stopped VM, a slot that is not a virtio-blk slot, a disk into a slot that already holds one,
a missing file. FAKE_ACRNCTL_HANG=1 makes it hang (for timeout tests).
"""

from __future__ import annotations

import json
import os
import sys
import threading

from .acrn_dm import write_record


def refuse(msg: str) -> int:
    """Print an error like acrnctl and return its failure code."""
    sys.stderr.write(f"acrnctl: {msg}\n")
    return 1


def blkrescan(rec_dir: str, vm: str, arg: str) -> int:
    """Swap the backing file of a virtio-blk slot of VM `vm`."""
    path = os.path.join(rec_dir, f"{vm}.json")
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return refuse(f"cannot find VM {vm}")
    if rec.get("exited"):
        return refuse(f"VM {vm} is not running")
    try:
        os.kill(int(rec["pid"]), 0)
    except OSError:
        return refuse(f"VM {vm} is not running")
    slot_text, sep, disk = arg.partition(",")
    if not sep or not slot_text.isdigit() or not disk:
        return refuse(f"blkrescan: bad argument {arg!r} (expected <slot>,<file>)")
    slot = rec["slots"].get(f"{int(slot_text)}:0")
    if slot is None or slot["emul"] != "virtio-blk":
        return refuse(f"blkrescan: slot {slot_text} of VM {vm} is not a virtio-blk device")
    if disk != "nodisk":
        if slot["current"] != "nodisk":
            return refuse(f"blkrescan: slot {slot_text} already has a disk ({slot['current']})")
        if not os.path.exists(disk):
            return refuse(f"blkrescan: cannot open {disk}")
    slot["current"] = disk
    write_record(path, rec)
    with open(os.path.join(rec_dir, "acrnctl.log"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"cmd": "blkrescan", "vm": vm, "arg": arg}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`acrnctl blkrescan VM SLOT,FILE`; other subcommands are refused."""
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("FAKE_ACRNCTL_HANG"):
        threading.Event().wait()
    rec_dir = os.environ.get("FAKE_ACRN_DIR", "")
    if not rec_dir:
        return refuse("FAKE_ACRN_DIR is not set (the fake needs it)")
    if len(args) == 3 and args[0] == "blkrescan":
        return blkrescan(rec_dir, args[1], args[2])
    return refuse(f"unsupported command {' '.join(args)!r} (the fake knows blkrescan)")


if __name__ == "__main__":
    sys.exit(main())
