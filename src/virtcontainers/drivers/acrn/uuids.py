"""ACRN VM UUIDs: a fixed pool, one UUID per sandbox, never handed out twice while in use.

Allocations live in a state-store document (`<run_root>/acrn/sbs/uuids/persist.json`, under
its flock) so that every process on the host sees the same table. An entry is in use until
its sandbox releases it, except when the entry names a VMM process (pid + start time) that
is gone: then the sandbox died without cleaning up and its UUID is reclaimed.
"""

from __future__ import annotations

import contextlib
import os
import uuid as uuidlib
from typing import Any

from ... import host, persist
from ...errors import HypervisorError

POOL_SIZE = 8
_NAMESPACE = uuidlib.UUID("6f1c1f64-7d4e-4c2a-9a53-9b1b3c0f7a10")
DEFAULT_POOL = tuple(str(uuidlib.uuid5(_NAMESPACE, f"acrn-vm-{i}")) for i in range(POOL_SIZE))
DOC_ID = "uuids"


class UuidAllocator:
    """Hands out UUIDs from `pool` to sandboxes, persisting the table in a `StateStore`."""

    def __init__(self, run_root: str | None = None, pool: tuple[str, ...] = DEFAULT_POOL) -> None:
        self.store = persist.StateStore(os.path.join(persist.run_root(run_root), "acrn"))
        self.pool = pool

    def _table(self) -> dict[str, dict[str, Any]]:
        doc = self.store.read(DOC_ID) if self.store.exists(DOC_ID) else {}
        table = doc.get("allocations", {})
        return {str(k): dict(v) for k, v in table.items()} if isinstance(table, dict) else {}

    def _write(self, table: dict[str, dict[str, Any]]) -> None:
        if table:
            self.store.write(DOC_ID, {"allocations": table})
        else:
            self.store.delete(DOC_ID)
            for d in (self.store.sbs_root, os.path.dirname(self.store.sbs_root)):
                with contextlib.suppress(OSError):
                    os.rmdir(d)  # only when empty: no other table lives there

    def allocate(self, sandbox_id: str) -> str:
        """The sandbox's UUID (the one it already holds, else the first free one)."""
        with self.store.lock(DOC_ID):
            table = self._table()
            for u, entry in table.items():
                if entry.get("sandbox") == sandbox_id:
                    return u
            for u, entry in list(table.items()):
                pid = int(entry.get("pid") or 0)
                if pid and not host.pid_is(pid, entry.get("start_time")):
                    del table[u]
            for u in self.pool:
                if u not in table:
                    table[u] = {"sandbox": sandbox_id, "pid": 0, "start_time": None}
                    self._write(table)
                    return u
        raise HypervisorError(
            f"acrn: no free VM UUID for sandbox {sandbox_id!r}: all {len(self.pool)} are in use"
        )

    def set_owner(self, uuid: str, pid: int, start_time: int | None) -> None:
        """Record the VMM process holding `uuid` (so a crash frees it)."""
        with self.store.lock(DOC_ID):
            table = self._table()
            if uuid in table:
                table[uuid]["pid"] = pid
                table[uuid]["start_time"] = start_time
                self._write(table)

    def release(self, sandbox_id: str) -> None:
        """Give back every UUID held by `sandbox_id` (no-op when it holds none)."""
        if not self.store.exists(DOC_ID):
            return  # nothing allocated: do not create a lock file just to find that out
        with self.store.lock(DOC_ID):
            table = self._table()
            kept = {u: e for u, e in table.items() if e.get("sandbox") != sandbox_id}
            if kept != table:
                self._write(kept)

    def in_use(self) -> dict[str, str]:
        """UUID -> sandbox id for the current allocations."""
        if not self.store.exists(DOC_ID):
            return {}
        with self.store.lock(DOC_ID):
            return {u: str(e.get("sandbox", "")) for u, e in self._table().items()}
