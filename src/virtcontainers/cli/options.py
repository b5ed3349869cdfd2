"""Options several commands share (sizing, guest assets, config file, boot timeout), and how
they become a sandbox configuration: `virtc run`/`create` and `virtc template`/`factory` read
them the same way."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .registry import Arg

if TYPE_CHECKING:
    from ..config import HypervisorConfig
    from .app import Globals

SANDBOX_ID = Arg("sandbox_id", metavar="ID", help="Sandbox id.")
WHICH_CONTAINER = Arg("--container", "-c", help="Which container, when the sandbox has several.")
CPUS = Arg("--cpus", "-c", type=int, help="vCPUs.")
MEMORY = Arg("--memory", "-m", help="Memory, e.g. 512M or 2G.")
CONFIG = Arg("--config", help="A Kata configuration.toml to start from.")
KERNEL = Arg("--kernel", help="Guest kernel path.")
INITRD = Arg("--initrd", help="Guest initrd path.")
KERNEL_PARAM = Arg(
    "--kernel-param", action="append", default=[], help="Extra kernel parameters (repeatable)."
)
TIMEOUT = Arg("--timeout", type=float, default=60.0, help="Boot timeout in seconds.")
GUEST = (CPUS, MEMORY, CONFIG, KERNEL, INITRD, KERNEL_PARAM)
"""The options that describe the VM: `config_request` reads them."""
COMMAND = Arg(
    "command", nargs=argparse.REMAINDER, metavar="COMMAND...", help="Command to run in the guest."
)


def guest_command(a: argparse.Namespace) -> list[str]:
    """The guest command after the options (a leading `--` dropped); `ConfigError` if none."""
    command: list[str] = a.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("no command given")
    return command


def parse_size_mib(text: str) -> int:
    """Parse a memory size: plain MiB ('512'), or with a unit ('512M', '2G', '1024MiB')."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = 1
    if t.endswith("G"):
        factor, t = 1024, t[:-1]
    elif t.endswith("M"):
        t = t[:-1]
    try:
        value = int(t) * factor
    except ValueError:
        raise ConfigError(f"invalid memory size {text!r} (e.g. 512, 512M, 2G)") from None
    if value <= 0:
        raise ConfigError(f"invalid memory size {text!r}: must be positive")
    return value


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    """HypervisorConfig overrides from the sizing and guest-asset options."""
    o: dict[str, Any] = {}
    if a.cpus is not None:
        if a.cpus <= 0:
            raise ConfigError(f"invalid --cpus {a.cpus}: must be positive")
        o["num_vcpus"] = a.cpus
    if a.memory is not None:
        o["memory_size"] = parse_size_mib(a.memory)
    if a.kernel_param:
        from ..types import Param, params_from_string

        params: list[Param] = []
        for e in a.kernel_param:
            params.extend(params_from_string(e))
        o["kernel_params"] = params
    for flag, path, field in (
        ("--kernel", a.kernel, "kernel_path"),
        ("--initrd", a.initrd, "initrd_path"),
    ):
        if path is not None:
            if not os.path.exists(path):
                raise ConfigError(f"{flag}: no such file {path}")
            o[field] = os.path.abspath(path)
    return o


def load_config(path: str | None, hypervisor: str) -> HypervisorConfig | None:
    """The `--config` file's section for `hypervisor` (None without --config)."""
    if path is None:
        return None
    from ..config import HypervisorConfig

    if not os.path.exists(path):
        raise ConfigError(f"--config: no such file {path}")
    return HypervisorConfig.from_toml(path, hypervisor=hypervisor)


def config_request(
    g: Globals, a: argparse.Namespace
) -> tuple[HypervisorConfig | None, dict[str, Any]]:
    """(base config, overrides) the `GUEST` options ask for: what `Sandbox(...)` takes, and
    what `sandbox.build_config` turns into the validated config."""
    return load_config(a.config, g.hypervisor), overrides(a)


def guest_options_given(a: argparse.Namespace) -> bool:
    """Whether any of the `GUEST` options was given."""
    return any(
        v not in (None, [])
        for v in (a.cpus, a.memory, a.config, a.kernel, a.initrd, a.kernel_param)
    )
