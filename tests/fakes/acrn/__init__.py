"""Fake ACRN binaries: `acrn_dm` (the device model) and `acrnctl` (block rescan), as processes."""
