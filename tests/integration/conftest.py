"""Integration-test fixtures: the leak check for real-VM tests (see `tests/leaks.py`)."""

from __future__ import annotations

from leaks import leak_check

__all__ = ["leak_check"]
