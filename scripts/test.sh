#!/usr/bin/env bash
# Set up, then run the linters and the whole test suite (unit, conformance, integration on real QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
echo "== mypy --strict"
.venv/bin/mypy src
echo "== guest assets"
.venv/bin/virtc assets build
echo "== pytest"
exec .venv/bin/pytest -ra "$@"
