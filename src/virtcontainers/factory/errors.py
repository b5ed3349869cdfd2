"""Errors of the VM factory: templates, the VM cache and its server."""

from __future__ import annotations

from ..errors import VCError


class TemplateError(VCError):
    """A VM template is missing, incomplete, corrupt or cannot be made; the message names it."""


class TemplateMismatchError(TemplateError):
    """A template cannot serve a request: different QEMU, kernel, initrd or config."""


class FactoryError(VCError):
    """The factory could not hand out a VM (pool empty past the deadline, base failing)."""


class CacheUnavailableError(FactoryError):
    """The VM cache server cannot be reached, went away, or refused the call."""


class CacheMismatchError(FactoryError):
    """The VM cache server's VMs cannot serve a request (another config); none was taken."""
