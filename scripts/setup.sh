#!/usr/bin/env bash
# Install everything virtcontainers needs on Debian 12 (run as root): system packages and a venv.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(
  python3 python3-venv python3-pip
  qemu-system-x86 qemu-utils qemu-system-common
  busybox-static cpio kmod lz4 gcc libc6-dev
  # vc-run links libseccomp statically (libseccomp.a) to apply OCI seccomp profiles
  libseccomp-dev
  # test images: Debian bookworm built by mmdebstrap (the busybox one uses busybox-static)
  mmdebstrap
  # Firecracker has no virtio-fs: a container root becomes an ext4 image (mke2fs -d)
  e2fsprogs
  iproute2 procps util-linux ca-certificates
  # sandbox networking: NAT and published ports (nft; iptables where nft is absent, and
  # for a FORWARD chain that drops); the network tests ping with DF set
  nftables iptables iputils-ping
  # the network benchmark's host-side iperf3 server (the guest's is in the Debian test image)
  iperf3
  # the benchmarks' libvirt baseline (its smoke test runs in the suite)
  libvirt-daemon-system libvirt-clients python3-libvirt
  # the containerd shim's tests run a private containerd (runc and runsc: the benchmarks'
  # baselines); its CRI plugin's pods get their network from the CNI bridge plugin
  containerd runc runsc containernetworking-plugins
)

missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
elif [ "$(id -u)" -eq 0 ] && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock || true)" ]; then
  # The guest kernel comes from Debian's archive: apt needs package lists to fetch it.
  apt-get update -q
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
