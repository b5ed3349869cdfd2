"""`python -m virtcontainers.shim`: the same as `containerd-shim-virtc-v2`."""

import sys

from .main import main

sys.exit(main())
