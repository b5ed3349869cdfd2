"""HTTP/1.1 over a Unix socket for the fake Firecracker, and its command line.

Flags of the real binary are accepted (`--api-sock`, `--id`, others tolerated). Extra flags
for tests:
  --fault hang-on=OP     never answer requests matching OP (operationId, action type, or
                         "METHOD /path"); repeatable
  --fault crash-on=OP    exit (code 134) when OP arrives
  --fault fail-on=OP     answer OP with 400 "injected failure"
  --fault slow=SECONDS   delay every answer
  --exit-at-start CODE   print an error and exit before serving
  --no-listen            never create the API socket (start-up timeout)
  --fake-version X.Y.Z   version to report (default 1.12.1, the binary tested here)
The env var FAKE_FC_FAULTS adds faults too (comma-separated), for launches through a driver.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from .vmm import FakeFirecracker, Fault, name_thread


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    vmm: FakeFirecracker


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        name_thread("fc_api")
        super().setup()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
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
        if vmm.exit_after_reply is not None:
            sys.stderr.write(f"fake firecracker: exiting after a failed request ({body})\n")
            sys.stderr.flush()
            os._exit(vmm.exit_after_reply)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _serve

    def address_string(self) -> str:
        return "api-client"

    def log_message(self, format: str, *args: Any) -> None:
        sys.stdout.write(f"[{self.server.vmm.id}:fc_api] {format % args}\n")
        sys.stdout.flush()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="fake-firecracker", add_help=True)
    p.add_argument("--api-sock", default="/run/firecracker.socket")
    p.add_argument("--id", default="anonymous-instance")
    p.add_argument("--version", action="store_true")
    p.add_argument("--fault", action="append", default=[])
    p.add_argument("--exit-at-start", type=int, default=None)
    p.add_argument("--no-listen", action="store_true")
    p.add_argument("--fake-version", default="1.12.1")
    return p.parse_known_args(argv)


def main(argv: list[str]) -> int:
    args, _tolerated = parse_args(argv)
    if args.version:
        print(f"Firecracker v{args.fake_version}")
        return 0
    env_faults = [f for f in os.environ.get("FAKE_FC_FAULTS", "").split(",") if f]
    for f in env_faults:
        key = f.partition("=")[0]
        if key == "exit-at-start":
            args.exit_at_start = int(f.partition("=")[2])
        elif key == "no-listen":
            args.no_listen = True
    faults = Fault.parse(
        args.fault
        + [f for f in env_faults if f.partition("=")[0] not in ("exit-at-start", "no-listen")]
    )
    print(f"[{args.id}:main] Running Firecracker v{args.fake_version} (fake)", flush=True)
    if args.exit_at_start is not None:
        print(f"[{args.id}:main] injected start-up failure", file=sys.stderr, flush=True)
        return int(args.exit_at_start)
    if args.no_listen:
        while True:
            time.sleep(3600)
    vmm = FakeFirecracker(args.id, args.fake_version, faults)
    try:
        server = _Server(args.api_sock, _Handler)
    except OSError as e:
        print(
            f"Error: Failed to bind and run the HTTP server: {e.strerror} ({args.api_sock})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    server.vmm = vmm
    print(f'[{args.id}:main] Listening on API socket ("{args.api_sock}").', flush=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with contextlib.suppress(KeyboardInterrupt):
        thread.join()
    return 0
