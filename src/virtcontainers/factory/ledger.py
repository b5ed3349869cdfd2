"""The VMs a cache server owns, on disk: if the server dies, whoever cleans up stops them.

Each entry names a VM id, its directory and (once known) its VMM pid and start time. The
server adds an entry before it boots a VM and removes it once the VM is handed out or stopped.
`reap` kills what the entries name (through pidfds, checking pid start times, and any VMM
whose command line uses the VM directory, for VMs killed mid-boot) and removes their
directories.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from typing import Any

from .. import host, persist
from ..drivers.vmm_process import kill_strays
from . import poolshare

log = logging.getLogger(__name__)

REAP_WAIT = 5.0


class Ledger:
    """A JSON file of owned VMs, rewritten atomically on every change."""

    def __init__(self, path: str, run_root: str | None = None) -> None:
        self.path = path
        self.run_root = run_root
        self._entries: dict[str, dict[str, Any]] = {}
        self._write()

    def add(self, vm_id: str, pid: int = 0) -> None:
        self._entries[vm_id] = {
            "id": vm_id,
            "vm_dir": persist.vm_dir(vm_id, self.run_root),
            "share_dir": poolshare.share_dir(self.run_root, vm_id),
            "pid": pid,
            "start_time": host.process_start_time(pid) if pid else None,
        }
        self._write()

    def remove(self, vm_id: str) -> None:
        if self._entries.pop(vm_id, None) is not None:
            self._write()

    def ids(self) -> list[str]:
        return list(self._entries)

    def _write(self) -> None:
        doc = {
            "owner": os.getpid(),
            "owner_start_time": host.process_start_time(os.getpid()),
            "vms": list(self._entries.values()),
        }
        persist.atomic_write(self.path, json.dumps(doc, indent=1).encode())


def read(path: str) -> tuple[int, int | None, list[dict[str, Any]]]:
    """(owner pid, owner start time, entries) of a ledger file; (0, None, []) if unreadable."""
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return 0, None, []
    if not isinstance(doc, dict):
        return 0, None, []
    vms = doc.get("vms")
    entries = [v for v in vms if isinstance(v, dict)] if isinstance(vms, list) else []
    try:
        owner = int(doc.get("owner") or 0)
    except (TypeError, ValueError):
        owner = 0
    start = doc.get("owner_start_time")
    return owner, start if isinstance(start, int) else None, entries


def reap(path: str, owner: int | None = None) -> list[str]:
    """Kill the VMs a dead server's ledger names, remove their directories and the ledger.

    Does nothing while the ledger's owner lives, or when `owner` is given and is not the
    ledger's owner. Returns the ids of the VMs it stopped.
    """
    if not os.path.exists(path):
        return []
    who, who_start, entries = read(path)
    if owner is not None and who != owner:
        return []
    if who and host.pid_is(who, who_start):
        return []
    recorded: list[tuple[int, int | None]] = []
    for e in entries:
        pid, start = int(e.get("pid") or 0), e.get("start_time")
        if host.signal_process(pid, start, signal.SIGKILL):
            recorded.append((pid, start))
        vm_dir = str(e.get("vm_dir") or "")
        if vm_dir:
            kill_strays(vm_dir, REAP_WAIT)  # killed mid-boot: no pid recorded yet
    deadline = time.monotonic() + REAP_WAIT
    while any(host.pid_is(p, s) for p, s in recorded) and time.monotonic() < deadline:
        time.sleep(0.02)
    for e in entries:
        share = str(e.get("share_dir") or "")
        if share:
            poolshare.release_quietly(share)
        vm_dir = str(e.get("vm_dir") or "")
        if vm_dir:
            shutil.rmtree(vm_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    ids = [str(e.get("id")) for e in entries]
    if ids:
        log.warning("stopped %d VM(s) a dead cache server left behind: %s", len(ids), ids)
    return ids
