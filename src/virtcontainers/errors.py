"""The error hierarchy: every error this package raises on purpose is a `VCError`."""

from __future__ import annotations

from collections.abc import Sequence


class VCError(Exception):
    """Base of every error virtcontainers raises deliberately."""


class ConfigError(VCError, ValueError):
    """A configuration value is missing, malformed or refused; the message names it."""


class AssetError(VCError):
    """A guest or host asset (kernel, initrd, image, binary) is missing or invalid."""


class StateError(VCError):
    """An operation is illegal in the VM's current lifecycle state, or state is unreadable."""


class HypervisorError(VCError):
    """The VMM failed or answered with an error."""


class UnsupportedError(HypervisorError):
    """The hypervisor cannot do the requested operation."""

    def __init__(self, hypervisor: str, operation: str, reason: str = "") -> None:
        self.hypervisor = hypervisor
        self.operation = operation
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"{hypervisor} does not support {operation}{detail}")


class LaunchError(HypervisorError):
    """The VMM process could not be started or exited during start-up."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        argv: Sequence[str] = (),
        log_tail: str = "",
    ) -> None:
        self.exit_code = exit_code
        self.argv = list(argv)
        self.log_tail = log_tail
        parts = [message]
        if exit_code is not None:
            parts.append(f"exit code {exit_code}")
        text = "; ".join(parts)
        if log_tail.strip():
            text += "\n--- log tail ---\n" + log_tail.rstrip()
        super().__init__(text)


class VMTimeoutError(HypervisorError, TimeoutError):
    """A VM operation did not complete within its deadline."""


class VMExitedError(HypervisorError):
    """The VMM process is gone (crashed or killed) while the VM was expected to run."""


class AgentError(VCError):
    """The guest agent could not be reached or answered with a protocol error."""


class HostError(VCError):
    """A host fact could not be read, or the host lacks something a VM needs."""


class ImageError(VCError):
    """An image archive, layer or reference is invalid or unknown; the message names it."""
