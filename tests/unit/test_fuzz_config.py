"""Fuzzing the configuration surface: `HypervisorConfig.from_dict`/`validate`, Kata TOML files
(random and mutated shipped ones) and annotations. Only `VCError`s may escape."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtcontainers.config import (
    ANNOTATION_PREFIX,
    KNOWN_ANNOTATIONS,
    HypervisorConfig,
    apply_annotations,
    load_toml,
)
from virtcontainers.errors import VCError

KATA_DIR = Path(__file__).parent.parent / "data" / "kata-config"
KATA_FILES = sorted(KATA_DIR.glob("*.toml"))
FIELDS = [f.name for f in dataclasses.fields(HypervisorConfig) if not f.name.startswith("_")]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def valid_dict() -> dict[str, Any]:
    cfg = HypervisorConfig(kernel_path="/k", initrd_path="/i")
    cfg.validate()
    return cfg.to_dict()


@SETTINGS
@given(st.dictionaries(st.sampled_from([*FIELDS, "custom_assets", "bogus"]), json_value))
def test_from_dict_and_validate_raise_only_vcerrors(data: dict[str, Any]) -> None:
    try:
        cfg = HypervisorConfig.from_dict(data)
    except VCError:
        return
    assert HypervisorConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    try:
        cfg.validate()
    except VCError:
        return
    assert cfg.num_vcpus >= 1 and cfg.memory_size >= 32


@SETTINGS
@given(st.sampled_from(FIELDS), json_value)
def test_one_corrupted_field_of_a_valid_dict(name: str, value: Any) -> None:
    data = valid_dict()
    data[name] = value
    try:
        cfg = HypervisorConfig.from_dict(data)
        cfg.validate()
    except VCError:
        pass


@SETTINGS
@given(st.text(max_size=400))
def test_random_toml_text(text: str) -> None:
    with contextlib.suppress(VCError):
        load_toml(text + "\n")


def mutate(text: str, rnd: random.Random) -> str:
    lines = text.splitlines()
    for _ in range(rnd.randint(1, 6)):
        if not lines:
            break
        i = rnd.randrange(len(lines))
        op = rnd.randrange(6)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[rnd.randrange(len(lines))])
        elif op == 2 and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            junk = rnd.choice(
                [
                    '"',
                    "-1",
                    "1e999",
                    "[1, 2]",
                    '"a,b\\nc"',
                    "true",
                    "{x=1}",
                    '["/", 3]',
                    "99999999999",
                ]
            )
            lines[i] = f"{key}= {junk}"
        elif op == 3:
            pos = rnd.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:pos] + chr(rnd.randrange(1, 0x250)) + lines[i][pos:]
        elif op == 4:
            lines[i] = lines[i][: rnd.randrange(len(lines[i]) + 1)]
        else:
            lines[i] = "[" + lines[i]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("path", KATA_FILES, ids=[p.name for p in KATA_FILES])
def test_mutated_shipped_kata_configs(path: Path) -> None:
    text = path.read_text()
    rnd = random.Random(path.name)
    loaded = 0
    for _ in range(150):
        try:
            result = load_toml(mutate(text, rnd))
        except VCError:
            continue
        loaded += 1
        with contextlib.suppress(VCError):
            result.config.validate()
    assert loaded > 0  # the mutations are not all fatal: the loader really ran


annotation_names = st.one_of(st.sampled_from(sorted(KNOWN_ANNOTATIONS)), st.text(max_size=20)).map(
    lambda n: ANNOTATION_PREFIX + n
)
hostile_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "/usr/bin/qemu-system-x86_64",
            "/usr/bin/../bin/sh",
            "/tmp/x,share=on",
            "a\nb",
            "init=/bin/sh",
            '["--foo", "-o", "x"]',
            "4294967296",
            "-1",
            "true",
            "kernel=/tmp/evil",
            "0" * 128,
        ]
    ),
)


@SETTINGS
@given(st.dictionaries(annotation_names, hostile_values, max_size=6))
def test_annotations_raise_only_config_errors_and_never_half_apply(
    annotations: dict[str, str],
) -> None:
    cfg = HypervisorConfig(kernel_path="/k", initrd_path="/i", enable_annotations=[".*"])
    cfg.hypervisor_path_list = ["/usr/bin/qemu-*"]
    before = cfg.to_dict()
    try:
        apply_annotations(cfg, annotations)
    except VCError:
        assert cfg.to_dict() == before
        return
    with contextlib.suppress(VCError):
        cfg.validate()


def test_shipped_configs_still_load() -> None:
    for path in KATA_FILES:
        result = load_toml(os.fspath(path))
        assert result.config.hypervisor_path or result.config.kernel_path, path
