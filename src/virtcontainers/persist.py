"""Where VM files live and how sandbox state is persisted (atomic files under flock)."""

from __future__ import annotations

import os


def run_root(override: str | None = None) -> str:
    """The run root: override > env VC_RUN_ROOT > /run/vc as root > $XDG_RUNTIME_DIR/vc."""
    if override:
        return override
    env = os.environ.get("VC_RUN_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/vc"
    xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vc-{os.getuid()}"
    return os.path.join(xdg, "vc")


def vm_root(run_root: str | None = None) -> str:
    """`<run_root>/vm`: the parent of every VM directory."""
    return os.path.join(_root(run_root), "vm")


def vm_dir(id: str, run_root: str | None = None) -> str:
    """`<run_root>/vm/<id>`: one VM's sockets, pid and log."""
    return os.path.join(vm_root(run_root), id)


def _root(override: str | None) -> str:
    return run_root(override)
