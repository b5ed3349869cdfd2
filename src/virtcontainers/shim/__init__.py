"""containerd-shim-virtc-v2: containerd's runtime v2 shim, running each pod in a sandbox VM."""
