"""`python -m virtcontainers.factory --run-root R`: the VM cache daemon (see `daemon.main`)."""

from __future__ import annotations

import sys

from .daemon import main

sys.exit(main())
