"""Guest assets: Debian's cloud kernel and an initrd whose /init is the virtcontainers agent."""

from __future__ import annotations

from .assets import (
    BUILDER_VERSION,
    GuestAssets,
    StaleEntry,
    asset_info,
    build_assets,
    default_cache_dir,
    ensure_assets,
    prune_assets,
    show_assets,
)
from .kernel import OPTIONAL_MODULES, REQUIRED_MODULES
from .params import AGENT_READY_MARKER, FAST_BOOT_PARAMS, default_kernel_params, loops_per_jiffy

__all__ = [
    "AGENT_READY_MARKER",
    "BUILDER_VERSION",
    "FAST_BOOT_PARAMS",
    "OPTIONAL_MODULES",
    "REQUIRED_MODULES",
    "GuestAssets",
    "StaleEntry",
    "asset_info",
    "build_assets",
    "default_cache_dir",
    "default_kernel_params",
    "ensure_assets",
    "loops_per_jiffy",
    "prune_assets",
    "show_assets",
]
