"""Containers inside a sandbox's guest (host side): specs, `Container`."""

from __future__ import annotations

from .container import Container, ContainerRecord
from .spec import Mount, ProcessSpec, from_oci

__all__ = ["Container", "ContainerRecord", "Mount", "ProcessSpec", "from_oci"]
