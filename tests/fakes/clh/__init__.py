"""A fake Cloud Hypervisor: a separate process serving the real API rules on a Unix socket.

Run it as `python -m tests.fakes.clh --api-socket path=PATH [--fake-...]`; every request body
is validated against the official OpenAPI spec (`tests/data/specs/cloud-hypervisor.yaml`).
`launcher.write_launcher()` writes an executable that a driver can use as its binary.
"""
