"""What a zygote imports before it serves: every module of the library (the CLI's commands,
the drivers, the gRPC client of the VM cache, the pydantic models, the image store, the shim
server), so that no command forked from it imports anything."""

from __future__ import annotations

import importlib
import logging
import pkgutil

log = logging.getLogger("virtcontainers.zygote")

SKIPPED = ("__main__",)
"""Modules that run something when imported."""


def preload() -> list[str]:
    """Import the library's modules; returns the names of those that failed (logged)."""
    import virtcontainers

    failed = []
    for info in pkgutil.walk_packages(virtcontainers.__path__, "virtcontainers."):
        if info.name.rsplit(".", 1)[-1] in SKIPPED:
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # an optional dependency missing: its commands import it
            log.warning("zygote: cannot preload %s: %s", info.name, exc)
            failed.append(info.name)
    return failed
