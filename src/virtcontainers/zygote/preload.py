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
STDLIB = ("concurrent.futures.thread", "importlib.resources.readers")
"""What commands import on first use outside the library (`asyncio.to_thread`'s pool,
package data)."""


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
    for name in STDLIB:
        importlib.import_module(name)
    build_models()
    from ..guest.assets import hash_inputs

    try:  # each sandbox's configuration looks its guest assets up by these hashes
        hash_inputs()
    except Exception as exc:  # no busybox yet, say: the command reports it
        log.warning("zygote: cannot hash the guest assets' inputs: %s", exc)
    return failed


def build_models() -> int:
    """Build the validators of the library's pydantic models now (they are deferred, so that
    importing the library stays cheap: each command would build those it uses, 2-3 ms
    each, after pydantic's first look for plugins, ~15 ms); returns how many were built."""
    from pydantic import BaseModel

    def subclasses(cls: type[BaseModel]) -> list[type[BaseModel]]:
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]

    built = 0
    for model in subclasses(BaseModel):
        if model.__module__.startswith("virtcontainers.") and not model.__pydantic_complete__:
            try:
                model.model_rebuild(force=True)
            except Exception as exc:  # a model another module completes: built on first use
                log.warning("zygote: cannot build %s: %s", model.__qualname__, exc)
                continue
            built += 1
    return built
