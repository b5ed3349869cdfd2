"""The local OCI image store: import without a registry, inspect, remove, unpack."""

from __future__ import annotations

from .archive import normalize_reference
from .store import Image, ImageConfig, ImageStore, default_image_root

__all__ = ["Image", "ImageConfig", "ImageStore", "default_image_root", "normalize_reference"]
