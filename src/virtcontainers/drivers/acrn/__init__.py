"""ACRN driver: `acrn-dm` command line, UUID allocation and `acrnctl` block hotplug."""

from .driver import Acrn
from .uuids import UuidAllocator

__all__ = ["Acrn", "UuidAllocator"]
