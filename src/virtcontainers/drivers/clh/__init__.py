"""Cloud Hypervisor driver: `cloud-hypervisor` driven over its REST API on a Unix socket."""

from .api import ClhApi, ClhApiError
from .driver import CloudHypervisor

__all__ = ["ClhApi", "ClhApiError", "CloudHypervisor"]
