"""HTTP/1.1 over a Unix socket for the fake Cloud Hypervisor, and its command line.

Flags of the real binary: `--api-socket path=PATH` (or a bare PATH), `--log-file PATH`, `-v`
(repeatable); other real flags are tolerated and ignored. Extra flags for tests:
  --fake-hang EP          never answer endpoint EP (e.g. vm.boot, vmm.ping); repeatable
  --fake-crash EP         die (exit 134, a panic line on stderr) when EP arrives; repeatable
  --fake-delay [EP=]SECS  answer EP (or everything) SECS seconds late; repeatable
  --fake-exit-at-start N  print an error and exit with code N before serving
  --fake-no-listen        never create the API socket (start-up timeout)
  --fake-ignore-sigterm   survive SIGTERM (only SIGKILL ends it)
  --fake-ignore-shutdown  answer vmm.shutdown but keep running
The env var FAKE_CLH_ARGS (shell words) adds flags, for launches through a driver.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from .vmm import FakeClh, name_thread

API_PREFIX = "/api/v1/"


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    vmm: FakeClh
    opts: argparse.Namespace
    log_file: Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        name_thread("http-server")
        super().setup()

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log = self.server.log_file
        if log is not None:
            log.write(time.strftime("%H:%M:%S ") + (format % args) + "\n")
            log.flush()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        endpoint = self.path.split("?", 1)[0]
        endpoint = endpoint[len(API_PREFIX) :] if endpoint.startswith(API_PREFIX) else endpoint
        opts = self.server.opts
        if endpoint in opts.fake_crash:
            sys.stderr.write(f"thread 'vmm' panicked: injected crash on {endpoint}\n")
            sys.stderr.flush()
            os._exit(134)
        if endpoint in opts.fake_hang:
            threading.Event().wait()
        delay = opts.delays.get(endpoint, opts.delays.get("*", 0.0))
        if delay:
            time.sleep(delay)
        vmm = self.server.vmm
        status, body = vmm.handle(self.command, self.path, raw)
        payload = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)
        self.wfile.flush()
        if vmm.shutdown_requested and not opts.fake_ignore_shutdown:
            threading.Thread(target=self.server.shutdown, daemon=True).start()

    do_GET = _serve
    do_PUT = _serve
    do_POST = _serve
    do_PATCH = _serve
    do_DELETE = _serve


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The real flags we need plus the fault flags; unknown real flags are ignored."""
    p = argparse.ArgumentParser(prog="cloud-hypervisor (fake)")
    p.add_argument("--api-socket", required=True)
    p.add_argument("--log-file", default="")
    p.add_argument("-v", action="count", default=0)
    p.add_argument("--fake-hang", action="append", default=[])
    p.add_argument("--fake-crash", action="append", default=[])
    p.add_argument("--fake-delay", action="append", default=[])
    p.add_argument("--fake-exit-at-start", type=int, default=None)
    p.add_argument("--fake-no-listen", action="store_true")
    p.add_argument("--fake-ignore-sigterm", action="store_true")
    p.add_argument("--fake-ignore-shutdown", action="store_true")
    opts, _unknown = p.parse_known_args(argv)
    spec = opts.api_socket
    if spec.startswith("path="):
        opts.api_path = spec[len("path=") :].split(",", 1)[0]
    elif "=" in spec:
        p.error(f"--api-socket {spec!r}: only path=<socket> is supported by the fake")
    else:
        opts.api_path = spec
    opts.delays = {}
    for item in opts.fake_delay:
        ep, _, secs = item.rpartition("=")
        opts.delays[ep or "*"] = float(secs)
    return opts


def main(argv: list[str] | None = None) -> int:
    """Serve until `vmm.shutdown` (exit 0) or a signal."""
    args = list(sys.argv[1:] if argv is None else argv)
    args += shlex.split(os.environ.get("FAKE_CLH_ARGS", ""))
    opts = parse_args(args)
    if opts.fake_exit_at_start is not None:
        sys.stderr.write("Error: injected start-up failure (fake cloud-hypervisor)\n")
        return int(opts.fake_exit_at_start)
    if opts.fake_ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_file = open(opts.log_file, "a", encoding="utf-8") if opts.log_file else None  # noqa: SIM115
    if opts.fake_no_listen:
        threading.Event().wait()
    if os.path.exists(opts.api_path):
        sys.stderr.write(f"Error: API socket {opts.api_path} already exists\n")
        return 1
    vmm = FakeClh()
    server = _Server(opts.api_path, _Handler)
    server.vmm, server.opts, server.log_file = vmm, opts, log_file
    if log_file is not None:
        log_file.write(f"cloud-hypervisor (fake) pid {os.getpid()} serving {opts.api_path}\n")
        log_file.flush()
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        vmm._stop_vm()
        server.server_close()
        with contextlib.suppress(OSError):
            os.unlink(opts.api_path)
        if log_file is not None:
            log_file.close()
    return 0
