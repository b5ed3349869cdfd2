#!/usr/bin/env bash
# Quick start: set up, boot a sandbox and run a command in it; then build the busybox test
# image (from Debian's busybox-static, cached), import it and run it as a container.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/virtc assets build
.venv/bin/virtc run -- sh -c 'echo "hello from $(uname -n): kernel $(uname -r), $(nproc) vCPU"'
image=$(.venv/bin/python -m virtcontainers.images.build busybox)
.venv/bin/virtc image import "$image"
exec .venv/bin/virtc run --image busybox -- sh -c 'echo "hello from a container: $(ls /)"'
