"""Files of the VM cache server under the run root (`<run root>/factory/`) and of VM templates
(`<run root>/templates/`)."""

from __future__ import annotations

import os

from .. import host, persist

TEMPLATE_METADATA = "template.json"
TEMPLATE_MEMORY = "memory"


def templates_dir(run_root: str | None = None) -> str:
    """The default template store's root."""
    return os.path.join(persist.run_root(run_root), "templates")


def factory_dir(run_root: str | None = None) -> str:
    return os.path.join(persist.run_root(run_root), "factory")


def socket_path(run_root: str | None = None) -> str:
    """The server's gRPC Unix socket (refused early if the path is too long for a socket)."""
    return host.build_socket_path(factory_dir(run_root), "cache.sock")


def pid_file(run_root: str | None = None) -> str:
    return os.path.join(factory_dir(run_root), "cache.pid")


def lock_file(run_root: str | None = None) -> str:
    return os.path.join(factory_dir(run_root), "cache.lock")


def ledger_file(run_root: str | None = None) -> str:
    return os.path.join(factory_dir(run_root), "pool.json")


def spec_file(run_root: str | None = None) -> str:
    return os.path.join(factory_dir(run_root), "spec.json")


def log_file(run_root: str | None = None) -> str:
    return os.path.join(factory_dir(run_root), "cache.log")


def zygote_socket(run_root: str | None = None) -> str:
    """The zygote's socket (`virtcontainers.zygote`), beside the server's own."""
    from ..zygote.protocol import SOCKET_NAME

    return host.build_socket_path(factory_dir(run_root), SOCKET_NAME)
