"""Integration-test fixtures: the leak check for real-VM tests (see `tests/leaks.py`)."""

from __future__ import annotations

from leaks import leak_check
from net_support import host_untouched

__all__ = ["host_untouched", "leak_check"]
