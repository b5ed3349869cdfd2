#!/usr/bin/env bash
# Quick start: set up, then boot a sandbox and run a command in it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/virtc assets build
exec .venv/bin/virtc run -- sh -c 'echo "hello from $(uname -n): kernel $(uname -r), $(nproc) vCPU"'
