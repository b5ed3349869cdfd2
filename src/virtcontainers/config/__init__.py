"""The VM's configuration: `HypervisorConfig` (model.py), Kata `configuration.toml` loading
(toml.py) and `io.katacontainers.config.hypervisor.*` annotations (annotations.py).

Importing it builds nothing beyond the model's dataclass and a few compiled patterns: no
validation, host probe or file access happens until a method is called. The TOML loader
(tomllib) loads on first use: `virtc run` and the factory's clients never read a TOML file.
"""

from typing import TYPE_CHECKING

from .. import _lazy_exports
from .annotations import ANNOTATION_PREFIX, KNOWN_ANNOTATIONS, apply_annotations, glob_match
from .model import (
    DEFAULT_BLOCK_DRIVER,
    DEFAULT_BRIDGES,
    DEFAULT_MEMORY_MIB,
    DEFAULT_MSIZE_9P,
    DEFAULT_VCPUS,
    INT_FIELD_MAX,
    MAX_BRIDGES,
    MAX_MEM_SLOTS,
    MAX_MEMORY_MIB,
    MAX_MSIZE_9P,
    MAX_PCIE_ROOT_PORTS,
    MIN_MEMORY_MIB,
    MIN_MSIZE_9P,
    SAFE_ENTROPY_SOURCES,
    SHARED_FS_VALUES,
    U32_MAX,
    UNSAFE_MACHINE_OPTIONS,
    UNSUPPORTED_FIELDS,
    VIRTIO_9P,
    VIRTIO_FS,
    VIRTIO_FS_CACHE_VALUES,
    VIRTIOFSD_FLAG_OPTIONS,
    VIRTIOFSD_LONG_OPTIONS,
    VIRTIOFSD_VALUE_OPTIONS,
    HypervisorConfig,
    check_virtiofsd_args,
)

if TYPE_CHECKING:
    from .toml import TOML_KEY_FOR_FIELD, TomlLoadResult, load_toml

__getattr__, __dir__ = _lazy_exports(
    __name__,
    dict.fromkeys(("TOML_KEY_FOR_FIELD", "TomlLoadResult", "load_toml"), ".toml"),
    globals(),
)

__all__ = [
    "ANNOTATION_PREFIX",
    "DEFAULT_BLOCK_DRIVER",
    "DEFAULT_BRIDGES",
    "DEFAULT_MEMORY_MIB",
    "DEFAULT_MSIZE_9P",
    "DEFAULT_VCPUS",
    "INT_FIELD_MAX",
    "KNOWN_ANNOTATIONS",
    "MAX_BRIDGES",
    "MAX_MEMORY_MIB",
    "MAX_MEM_SLOTS",
    "MAX_MSIZE_9P",
    "MAX_PCIE_ROOT_PORTS",
    "MIN_MEMORY_MIB",
    "MIN_MSIZE_9P",
    "SAFE_ENTROPY_SOURCES",
    "SHARED_FS_VALUES",
    "TOML_KEY_FOR_FIELD",
    "U32_MAX",
    "UNSAFE_MACHINE_OPTIONS",
    "UNSUPPORTED_FIELDS",
    "VIRTIOFSD_FLAG_OPTIONS",
    "VIRTIOFSD_LONG_OPTIONS",
    "VIRTIOFSD_VALUE_OPTIONS",
    "VIRTIO_9P",
    "VIRTIO_FS",
    "VIRTIO_FS_CACHE_VALUES",
    "HypervisorConfig",
    "TomlLoadResult",
    "apply_annotations",
    "check_virtiofsd_args",
    "glob_match",
    "load_toml",
]
