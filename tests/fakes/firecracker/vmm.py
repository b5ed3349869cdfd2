"""The fake Firecracker's state machine: the real server's rules, every body checked by the spec.

Rules reproduced from Firecracker v1.12.1 as observed on this project's machines (messages are
the real ones): unknown fields refused, resource ids `[A-Za-z0-9_]`, pre-boot-only and
post-boot-only operations, `PATCH /vm` only after boot, snapshots only while paused,
`/snapshot/load` only on a fresh process (a failed load ends the process), logger/metrics/drive/
kernel paths must exist, the vsock Unix socket bound at start (relative paths resolve against
the working directory, as in the real one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..spec import ApiSpec, SpecError, decode_json

SPEC_PATH = Path(__file__).resolve().parents[2] / "data" / "specs" / "firecracker.yaml"
_ID_RE = re.compile(r"^[A-Za-z0-9_]+$")
_PR_SET_NAME = 15

NOT_BEFORE = "The requested operation is not supported before starting the microVM."
NOT_AFTER = "The requested operation is not supported after starting the microVM."
BAD_ID = "API Resource IDs can only contain alphanumeric characters and underscores."
ID_MISMATCH = "The id from the path does not match the id from the body!"
DESERIALIZE = "An error occurred when deserializing the json body of a request: "
# Fields the spec (1.17) has that older servers refuse as unknown: (field path, first version).
_NEWER_FIELDS = {
    ("loadSnapshot", "vsock_override"): (1, 16),
    ("loadSnapshot", "clock_realtime"): (1, 14),
    ("loadSnapshot", "huge_pages"): (1, 17),
    ("loadSnapshot", "track_dirty_pages"): (1, 13),
    ("putMetrics", "emit_id"): (1, 17),
    ("putMetrics", "properties"): (1, 17),
    ("putGuestNetworkInterfaceByID", "mtu"): (1, 15),
}


@dataclass
class Fault:
    """Injected misbehaviour, matched against an operationId, action type or `METHOD /path`."""

    hang_on: set[str] = field(default_factory=set)
    crash_on: set[str] = field(default_factory=set)
    fail_on: set[str] = field(default_factory=set)
    slow: float = 0.0

    @classmethod
    def parse(cls, specs: list[str]) -> Fault:
        f = cls()
        for spec in specs:
            key, _, value = spec.partition("=")
            if key == "hang-on":
                f.hang_on.add(value)
            elif key == "crash-on":
                f.crash_on.add(value)
            elif key == "fail-on":
                f.fail_on.add(value)
            elif key == "slow":
                f.slow = float(value)
            else:
                raise SystemExit(f"fake firecracker: unknown fault {spec!r}")
        return f


class Reply(Exception):
    """An HTTP answer raised from deep inside a handler."""

    def __init__(self, status: int, body: dict[str, Any] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def fault(message: str, status: int = 400) -> Reply:
    return Reply(status, {"fault_message": message})


def name_thread(name: str) -> None:
    """Set the calling thread's kernel name (what /proc/<pid>/task/<tid>/comm shows)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


class FakeFirecracker:
    """One fake microVM: configuration, phase, vCPU threads, vsock listener."""

    def __init__(self, instance_id: str, version: str, faults: Fault) -> None:
        self.id = instance_id
        self.version = version
        self.version_tuple = tuple(int(x) for x in version.split(".")[:2])
        self.faults = faults
        self.spec = ApiSpec.load(SPEC_PATH, strict=True)
        self.lock = threading.Lock()
        self.state = "Not started"
        self.configured = False  # anything beyond logger/metrics
        self.logger: dict[str, Any] | None = None
        self.metrics: dict[str, Any] | None = None
        self.machine: dict[str, Any] = {
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": False,
            "track_dirty_pages": False,
            "huge_pages": "None",
        }
        self.boot: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.nets: dict[str, dict[str, Any]] = {}
        self.vsock: dict[str, Any] | None = None
        self.vcpu_stop = threading.Event()
        self.vcpus: list[threading.Thread] = []
        self.vsock_listener: socket.socket | None = None
        self.exit_after_reply: int | None = None

    # -- dispatch ------------------------------------------------------------------------------
    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        """Answer one request: (status, JSON body or None)."""
        try:
            return self._handle(method, path, raw)
        except Reply as r:
            return r.status, r.body

    def _handle(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        route = path.split("?", 1)[0]
        try:
            op, params = self.spec.find(method, route)
        except SpecError:
            raise fault(
                f"Invalid request method and/or path: {method.capitalize()} {route.lstrip('/')}."
            ) from None
        try:
            body = decode_json(raw)
        except SpecError as e:
            raise fault(DESERIALIZE + str(e)) from None
        names = {op.operation_id, f"{method} {route}"}
        if isinstance(body, dict) and "action_type" in body:
            names.add(str(body["action_type"]))
        self._inject(names)
        self._check_body(op.operation_id, method, route, body, raw)
        handler = getattr(self, "op_" + op.operation_id, None)
        if handler is None:
            raise fault(f"fake firecracker: {op.operation_id} is not emulated")
        with self.lock:
            result: tuple[int, dict[str, Any] | None] = handler(body, params)
        return result

    def _inject(self, names: set[str]) -> None:
        if self.faults.slow:
            time.sleep(self.faults.slow)
        if names & self.faults.crash_on:
            os.write(2, f"fake firecracker: injected crash on {sorted(names)}\n".encode())
            os._exit(134)
        if names & self.faults.hang_on:
            while True:
                time.sleep(3600)
        if names & self.faults.fail_on:
            raise fault(f"injected failure on {sorted(names & self.faults.fail_on)[0]}")

    def _check_body(self, op_id: str, method: str, route: str, body: Any, raw: bytes) -> None:
        if isinstance(body, dict):
            for key in body:
                first = _NEWER_FIELDS.get((op_id, key))
                if first and self.version_tuple < first:
                    raise fault(DESERIALIZE + f"unknown field `{key}` at line 1 column 1.")
        try:
            self.spec.validate(method, route, body, raw=raw)
        except SpecError as e:
            if e.unknown_field:
                raise fault(
                    DESERIALIZE + f"unknown field `{e.unknown_field}` at line 1 column 1."
                ) from None
            raise fault(DESERIALIZE + str(e)) from None

    # -- helpers -------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.state != "Not started"

    def _pre_boot(self) -> None:
        if self.started:
            raise fault(NOT_AFTER)

    def _post_boot(self) -> None:
        if not self.started:
            raise fault(NOT_BEFORE)

    @staticmethod
    def _check_id(path_id: str, body_id: str) -> None:
        if not _ID_RE.match(path_id) or not _ID_RE.match(body_id):
            raise fault(BAD_ID)
        if path_id != body_id:
            raise fault(ID_MISMATCH)

    @staticmethod
    def _openable(path: str, what: str, write: bool = False) -> None:
        try:
            fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
        except OSError as e:
            raise fault(f"{what}: {e.strerror} (os error {e.errno})") from None
        os.close(fd)

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "vmm_version": self.version,
            "app_name": "Firecracker",
        }

    # -- GET -----------------------------------------------------------------------------------
    def op_describeInstance(self, body: Any, params: dict[str, str]) -> tuple[int, Any]:
        return 200, self.info()

    def op_getFirecrackerVersion(self, body: Any, params: dict[str, str]) -> tuple[int, Any]:
        return 200, {"firecracker_version": self.version}

    def op_getMachineConfiguration(self, body: Any, params: dict[str, str]) -> tuple[int, Any]:
        return 200, dict(self.machine)

    def op_getExportVmConfig(self, body: Any, params: dict[str, str]) -> tuple[int, Any]:
        return 200, self.full_config()

    def full_config(self) -> dict[str, Any]:
        return {
            "boot-source": self.boot,
            "machine-config": dict(self.machine),
            "drives": list(self.drives.values()),
            "network-interfaces": list(self.nets.values()),
            "vsock": self.vsock,
            "logger": self.logger,
            "metrics": self.metrics,
        }

    # -- pre-boot configuration ----------------------------------------------------------------
    def op_putLogger(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        if "log_path" in body:
            self._openable(body["log_path"], "Logger error: Failed to open target file", True)
        self.logger = body
        return 204, None

    def op_putMetrics(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        if self.metrics is not None:
            raise fault("Metrics error: Reinitialization of metrics not allowed.")
        self._openable(
            body["metrics_path"],
            "Metrics error: Cannot initialize the metrics system due to bad user input",
            True,
        )
        self.metrics = body
        return 204, None

    def op_putMachineConfiguration(
        self, body: dict[str, Any], params: dict[str, str]
    ) -> tuple[int, Any]:
        self._pre_boot()
        if body.get("smt") and body["vcpu_count"] > 1 and body["vcpu_count"] % 2:
            raise fault("The number of vCPUs must be 1 or an even number when SMT is enabled.")
        if body.get("huge_pages") == "2M" and body["mem_size_mib"] % 2:
            raise fault("Memory size must be a multiple of 2 MiB with 2M huge pages.")
        self.machine = {
            "vcpu_count": body["vcpu_count"],
            "mem_size_mib": body["mem_size_mib"],
            "smt": body.get("smt", False),
            "track_dirty_pages": body.get("track_dirty_pages", False),
            "huge_pages": body.get("huge_pages", "None"),
        }
        self.configured = True
        return 204, None

    def op_putGuestBootSource(
        self, body: dict[str, Any], params: dict[str, str]
    ) -> tuple[int, Any]:
        self._pre_boot()
        self._openable(
            body["kernel_image_path"], "Boot source error: The kernel file cannot be opened"
        )
        if body.get("initrd_path"):
            self._openable(
                body["initrd_path"], "Boot source error: The initrd file cannot be opened"
            )
        self.boot = {
            "kernel_image_path": body["kernel_image_path"],
            "initrd_path": body.get("initrd_path"),
            "boot_args": body.get("boot_args"),
        }
        self.configured = True
        return 204, None

    def op_putGuestDriveByID(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        self._pre_boot()
        self._check_id(params["drive_id"], body["drive_id"])
        if "path_on_host" in body:
            self._openable(
                body["path_on_host"],
                "Drive config error: Unable to open block device backing file",
                not body.get("is_read_only", False),
            )
        if body["is_root_device"] and any(
            d["is_root_device"] and d["drive_id"] != body["drive_id"] for d in self.drives.values()
        ):
            raise fault("Drive config error: A root block device already exists!")
        self.drives[body["drive_id"]] = {"cache_type": "Unsafe", "io_engine": "Sync", **body}
        self.configured = True
        return 204, None

    def op_putGuestNetworkInterfaceByID(
        self, body: dict[str, Any], params: dict[str, str]
    ) -> tuple[int, Any]:
        self._pre_boot()
        self._check_id(params["iface_id"], body["iface_id"])
        for other in self.nets.values():
            if (
                other["iface_id"] != body["iface_id"]
                and other["host_dev_name"] == body["host_dev_name"]
            ):
                raise fault("The host device name is already in use.")
        self.nets[body["iface_id"]] = body
        self.configured = True
        return 204, None

    def op_putGuestVsock(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        self._pre_boot()
        self.vsock = {"guest_cid": body["guest_cid"], "uds_path": body["uds_path"]}
        self.configured = True
        return 204, None

    # -- actions and post-boot -----------------------------------------------------------------
    def op_createSyncAction(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        action = body["action_type"]
        if action == "InstanceStart":
            self._pre_boot()
            if self.boot is None:
                raise fault(
                    "Start microvm error: Cannot start microvm without kernel configuration."
                )
            self._bind_vsock(self.vsock["uds_path"] if self.vsock else None, "Start microvm error")
            self._start_vcpus()
            self.state = "Running"
            return 204, None
        self._post_boot()
        return 204, None

    def op_patchVm(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        self._post_boot()
        self.state = "Paused" if body["state"] == "Paused" else "Running"
        return 204, None

    def op_patchGuestDriveByID(
        self, body: dict[str, Any], params: dict[str, str]
    ) -> tuple[int, Any]:
        self._post_boot()
        self._check_id(params["drive_id"], body["drive_id"])
        drive = self.drives.get(body["drive_id"])
        if drive is None:
            raise fault(
                "Drive config error: Unable to patch the block device: Device manager error: "
                "Failed to find the device on the bus. Please verify the request arguments."
            )
        if "path_on_host" in body:
            self._openable(
                body["path_on_host"],
                "Drive config error: Unable to patch the block device: cannot open backing file",
                not drive.get("is_read_only", False),
            )
            drive["path_on_host"] = body["path_on_host"]
        return 204, None

    def op_createSnapshot(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        self._post_boot()
        if self.state != "Paused":
            raise fault(
                "Create snapshot error: Cannot save the microVM state: Operation not allowed: "
                "save/restore unavailable while running"
            )
        doc = {"fake_firecracker_snapshot": 1, "version": self.version, **self.full_config()}
        try:
            with open(body["snapshot_path"], "w", encoding="utf-8") as f:
                json.dump(doc, f)
            with open(body["mem_file_path"], "wb") as f:
                f.truncate(self.machine["mem_size_mib"] << 20)
        except OSError as e:
            raise fault(f"Create snapshot error: {e.strerror} (os error {e.errno})") from None
        return 204, None

    def op_loadSnapshot(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        if self.started or self.configured:
            raise fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
            )
        mem = body.get("mem_file_path") or (body.get("mem_backend") or {}).get("backend_path")
        if not mem or ("mem_file_path" in body and "mem_backend" in body):
            raise fault("Load snapshot error: exactly one of mem_file_path and mem_backend")
        try:
            with open(body["snapshot_path"], encoding="utf-8") as f:
                doc = json.load(f)
            os.close(os.open(mem, os.O_RDONLY))
            if doc.get("fake_firecracker_snapshot") != 1:
                raise ValueError("not a snapshot file")
            vsock = doc.get("vsock")
            uds = (body.get("vsock_override") or {}).get("uds_path") or (vsock or {}).get(
                "uds_path"
            )
            for d in doc.get("drives", []):
                if d.get("path_on_host"):
                    os.close(os.open(d["path_on_host"], os.O_RDONLY))
            self._bind_vsock(uds, "Load snapshot error: Failed to restore from snapshot")
        except (OSError, ValueError, Reply) as e:
            message = (
                e.body["fault_message"]
                if isinstance(e, Reply) and e.body
                else f"Load snapshot error: Failed to restore from snapshot: {e}"
            )
            self.exit_after_reply = 1  # the real server exits after a failed load
            raise fault(message) from None
        self.machine = doc["machine-config"]
        self.boot = doc["boot-source"]
        self.drives = {d["drive_id"]: d for d in doc.get("drives", [])}
        overrides = {o["iface_id"]: o["host_dev_name"] for o in body.get("network_overrides", [])}
        self.nets = {
            n["iface_id"]: {**n, "host_dev_name": overrides.get(n["iface_id"], n["host_dev_name"])}
            for n in doc.get("network-interfaces", [])
        }
        self.vsock = dict(vsock, uds_path=uds) if vsock else None
        self.configured = True
        self._start_vcpus()
        self.state = "Running" if body.get("resume_vm") else "Paused"
        return 204, None

    # -- guest side ----------------------------------------------------------------------------
    def _bind_vsock(self, uds_path: str | None, context: str) -> None:
        if not uds_path:
            return
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(uds_path)
            listener.listen(16)
        except OSError as e:
            listener.close()
            raise fault(
                f"{context}: VsockUnixBackend: Error binding to the host-side Unix socket: "
                f"{e.strerror} (os error {e.errno})"
            ) from None
        self.vsock_listener = listener
        threading.Thread(target=self._vsock_loop, args=(listener,), daemon=True).start()

    @staticmethod
    def _vsock_loop(listener: socket.socket) -> None:
        # No guest: every CONNECT finds nobody listening, so the connection is closed.
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    def _start_vcpus(self) -> None:
        for i in range(int(self.machine["vcpu_count"])):
            named = threading.Event()
            t = threading.Thread(target=self._vcpu, args=(i, named), daemon=True)
            t.start()
            named.wait()  # like the real one: vCPU threads exist when InstanceStart answers
            self.vcpus.append(t)

    def _vcpu(self, index: int, named: threading.Event) -> None:
        name_thread(f"fc_vcpu {index}")
        named.set()
        self.vcpu_stop.wait()
