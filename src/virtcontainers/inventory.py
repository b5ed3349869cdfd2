"""The persisted sandboxes and their liveness, read from the state store alone.

`virtc list`, `virtc inspect` and `Sandbox.list()` use this: it reads state documents and
checks VMM pids, without loading drivers, the agent client or asyncio, so listing stays
cheap enough to run in a loop (and for a containerd shim to run per container).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from . import persist
from .errors import StateError

STARTING = "starting"
"""Persisted while the VMM runs but start has not finished (it names the VMM's pid)."""
DEAD = "dead"
"""Reported for a sandbox whose state says its VM runs while its VMM process is gone."""
_LIVE_STATES = ("running", "paused", STARTING)


@dataclass(frozen=True)
class SandboxInfo:
    """A persisted sandbox as `Sandbox.list()` reports it."""

    id: str
    hypervisor: str
    state: str
    pid: int
    created_at: float
    vcpus: int
    memory_mb: int
    ip: str = ""
    """The guest's (first IPv4) address when it has a network."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return dataclasses.asdict(self)


def recorded_state(store: persist.StateStore, id: str, doc: dict[str, Any]) -> str:
    """The sandbox state a document records ("" if none): a running VM's pause state is the
    separately kept run state, which pause and resume update without rewriting the document."""
    state = str(doc.get("sandbox", {}).get("state", ""))
    if state in ("running", "paused"):
        state = store.runstate(id) or state
    return state


def live_state(store: persist.StateStore, id: str, doc: dict[str, Any]) -> str:
    """`recorded_state`, except that a live state whose VMM process is gone is "dead" (the
    mock runs no process: its recorded state stands)."""
    from .host import pid_is

    state = recorded_state(store, id, doc) or "unknown"
    if state not in _LIVE_STATES or doc.get("sandbox", {}).get("hypervisor") == "mock":
        return state
    hs = doc.get("hypervisor", {})
    pid = int(hs.get("pid") or 0)
    alive = bool(pid) and pid_is(pid, int(hs.get("pid_start_time") or 0))
    return state if alive else DEAD


def sandbox_info(store: persist.StateStore, id: str) -> SandboxInfo:
    """What `Sandbox.list()` says of one sandbox (`StateError` when its state is unreadable)."""
    doc = store.read(id)
    sb = doc.get("sandbox", {})
    cfg = doc.get("config", {})
    return SandboxInfo(
        id=id,
        hypervisor=str(sb.get("hypervisor", "")),
        state=live_state(store, id, doc),
        pid=int(doc.get("hypervisor", {}).get("pid") or 0),
        created_at=float(sb.get("created_at", 0.0)),
        vcpus=int(cfg.get("num_vcpus", 0)),
        memory_mb=int(cfg.get("memory_size", 0)),
        ip=_network_ip(sb.get("network")),
    )


def _network_ip(record: dict[str, Any] | None) -> str:
    """The guest's first IPv4 address in a persisted network record, as
    `SandboxNetwork.summary()` reports it (read from the record: the network package
    imports netlink, which listing must not pay for)."""
    if not record:
        return ""
    if record.get("address"):
        return str(record["address"]).split("/")[0]
    import ipaddress

    for iface in record.get("interfaces") or []:
        for a in iface.get("addresses") or []:
            if ipaddress.ip_address(a["ip"]).version == 4:
                return str(a["ip"])
    return ""


def list_sandboxes(run_root: str | None = None) -> list[SandboxInfo]:
    """Every persisted sandbox under the run root, with its liveness checked (unreadable ones
    are skipped with a warning)."""
    store = persist.StateStore(persist.run_root(run_root))
    out: list[SandboxInfo] = []
    for sid in store.list():
        try:
            out.append(sandbox_info(store, sid))
        except StateError as e:
            import logging

            logging.getLogger(__name__).warning("skipping sandbox %s: %s", sid, e)
    return out


def one_sandbox(id: str, run_root: str | None = None) -> SandboxInfo:
    """One persisted sandbox as `list_sandboxes` reports it (`StateError` when there is none)."""
    store = persist.StateStore(persist.run_root(run_root))
    if not store.exists(id):
        raise StateError(f"no such sandbox: {id}")
    return sandbox_info(store, id)
