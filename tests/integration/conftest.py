"""Integration-test fixtures: the leak check for real-VM tests (see `tests/leaks.py`), and
an image store holding the busybox image."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from leaks import leak_check
from net_support import host_untouched
from virtcontainers.images import ImageStore


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    """A store with the busybox image; no sandbox may keep its lease."""
    from virtcontainers.images.build import busybox_image

    s = ImageStore(str(tmp_path_factory.mktemp("images")))
    s.import_archive(busybox_image())
    yield s
    assert not os.listdir(os.path.join(s.root, "leases")), "a sandbox kept its image lease"


__all__ = ["host_untouched", "leak_check"]
