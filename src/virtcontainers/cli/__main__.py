"""`python -m virtcontainers.cli`."""

from . import main

main()
