"""A fake Firecracker: a separate process that serves the real API rules on a Unix socket.

Run it as `python -m tests.fakes.firecracker --api-sock PATH --id ID [--fault ...]`; it accepts
the real binary's flags (unknown ones are tolerated) and validates every body against the spec.
"""
