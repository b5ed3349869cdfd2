"""The shim's configuration.toml: the hypervisor section and Kata's `[factory]` section."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtcontainers.errors import ConfigError
from virtcontainers.shim.config import DEFAULT_TEMPLATE, FactoryConfig, ShimConfig

HYPERVISOR = "[hypervisor.qemu]\ndefault_memory = 256\n"


def load(tmp_path: Path, factory: str) -> ShimConfig:
    path = tmp_path / "configuration.toml"
    path.write_text(f"{HYPERVISOR}\n[factory]\n{factory}")
    return ShimConfig.load(str(path))


def test_factory_section_as_kata_writes_it(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'enable_template = true\ntemplate_path = "/run/vc/templates/shim"\n')
    assert cfg.hypervisor_config is not None and cfg.hypervisor_config.memory_size == 256
    assert cfg.factory.enabled and cfg.factory.template() == ("/run/vc/templates", "shim")
    cache = load(tmp_path, 'vm_cache_number = 3\nvm_cache_endpoint = "/run/vc/cache.sock"\n')
    assert cache.factory.enabled and not cache.factory.enable_template
    assert cache.factory.vm_cache_endpoint == "/run/vc/cache.sock"
    off = load(tmp_path, "enable_template = false\nvm_cache_number = 0\n")
    assert not off.factory.enabled
    assert FactoryConfig(enable_template=True).template() == (None, DEFAULT_TEMPLATE)
    plain = tmp_path / "plain.toml"
    plain.write_text(HYPERVISOR)
    assert not ShimConfig.load(str(plain)).factory.enabled


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("enable_templates = true\n", "unknown key 'enable_templates' in \\[factory\\]"),
        ('enable_template = "yes"\n', "enable_template must be a bool"),
        ("vm_cache_number = true\n", "vm_cache_number must be a int"),
        ("vm_cache_number = -1\n", "must not be negative"),
        ("enable_template = true\nvm_cache_number = 2\n", "use one of them"),
        ('enable_template = true\ntemplate_path = "rel/t"\n', "template_path must be an absolute"),
    ],
)
def test_bad_factory_sections_name_the_key(tmp_path: Path, factory: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load(tmp_path, factory)
    assert "configuration.toml" in str(err.value)
