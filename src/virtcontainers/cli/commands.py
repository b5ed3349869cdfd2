"""Subcommands of `virtc`, registered on import."""

from __future__ import annotations
