"""The fake Cloud Hypervisor's state machine: the real server's rules, every body spec-checked.

Rules reproduced (see tests/data/specs/SOURCES.md for why codes differ from the spec):
- `vm.create` once, before `vm.boot`; `vm.boot` only on a Created VM (else 500);
- `vm.info` before `vm.create` answers 500 (upstream #8678), not the documented 404;
- pause only when Running, resume only when Paused, snapshot only when Paused: 500 (#8680);
- `vm.add-*` without a VM: 404; with a duplicate id: 409; with a bad body: 400;
- `vm.remove-device` of an unknown id: 404; `vm.restore` when a VM exists: 500;
- boot opens the payload and disk files, binds the serial and vsock sockets (an existing path is
  an error, as for the real bind), connects to every virtio-fs socket;
- vhost-user (virtio-fs) needs shared memory; resize within max_vcpus and size + hotplug_size;
  ACPI memory cannot shrink;
- error bodies are JSON arrays of strings; vCPU threads are named `vcpu<N>`.
Request bodies are validated in strict mode (unknown fields refused): the real server ignores
unknown fields silently, so a typo in a driver would go unnoticed against it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..spec import ApiSpec, SpecError, decode_json

SPEC_PATH = Path(__file__).resolve().parents[2] / "data" / "specs" / "cloud-hypervisor.yaml"
_PR_SET_NAME = 15
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

Reply = tuple[int, Any]


def name_thread(name: str) -> None:
    """Set the calling OS thread's name (what /proc/<pid>/task/<tid>/comm shows)."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class ApiFailure(Exception):
    """An error answer: HTTP status and the error chain (a JSON array of strings)."""

    def __init__(self, status: int, *chain: str) -> None:
        super().__init__(": ".join(chain))
        self.status = status
        self.chain = list(chain)


class VcpuThread(threading.Thread):
    """A thread named `vcpu<N>` that idles until stopped."""

    def __init__(self, index: int) -> None:
        super().__init__(daemon=True, name=f"vcpu{index}")
        self.index = index
        self.stop_event = threading.Event()
        self.named = threading.Event()

    def run(self) -> None:
        name_thread(f"vcpu{self.index}")
        self.named.set()
        self.stop_event.wait()


class FakeClh:
    """One fake VMM: at most one VM, driven by `handle(method, path, raw_body)`."""

    def __init__(self, spec: ApiSpec | None = None) -> None:
        self.spec = spec or ApiSpec.load(SPEC_PATH, strict=True)
        self.lock = threading.RLock()
        self.config: dict[str, Any] | None = None
        self.state = ""  # "", Created, Running, Paused, Shutdown
        self.vcpus: list[VcpuThread] = []
        self.listeners: list[tuple[socket.socket, str]] = []
        self.fs_conns: dict[str, socket.socket] = {}
        self.slots: dict[str, int] = {}
        self.counter = 0
        self.shutdown_requested = False
        self.requests: list[tuple[str, str]] = []

    # -- dispatch --------------------------------------------------------------------------
    def handle(self, method: str, path: str, raw: bytes) -> Reply:
        """Answer one request: (status, JSON-able body or None)."""
        with self.lock:
            try:
                body = decode_json(raw)
                op = self.spec.validate(method, path, body, raw=raw)
            except SpecError as e:
                if e.kind == "route":
                    return 404, ["Unknown endpoint", str(e)]
                return 400, ["Error parsing request", str(e)]
            name = op.template.lstrip("/")
            self.requests.append((method, name))
            handler = getattr(self, "do_" + name.replace(".", "_").replace("-", "_"), None)
            if handler is None:
                return 500, [f"{name}: not implemented by the fake cloud-hypervisor"]
            try:
                result: Reply = handler(body)
            except ApiFailure as e:
                return e.status, e.chain
            return result

    def _need_vm(self, what: str, status: int = 500) -> dict[str, Any]:
        if self.config is None:
            raise ApiFailure(status, f"Error {what}", "VM is not created")
        return self.config

    # -- VMM -------------------------------------------------------------------------------
    def do_vmm_ping(self, _body: Any) -> Reply:
        return 200, {
            "build_version": "fake",
            "version": "v53.0-fake",
            "pid": os.getpid(),
            "features": [],
        }

    def do_vmm_shutdown(self, _body: Any) -> Reply:
        self._stop_vm()
        self.shutdown_requested = True
        return 204, None

    # -- VM lifecycle ----------------------------------------------------------------------
    def do_vm_create(self, body: dict[str, Any]) -> Reply:
        if self.config is not None:
            raise ApiFailure(500, "Error creating VM", "VM is already created")
        self._check_config(body)
        self.config = copy.deepcopy(body)
        self.state = "Created"
        return 204, None

    def _check_config(self, cfg: dict[str, Any]) -> None:
        cpus = cfg.get("cpus") or {"boot_vcpus": 1, "max_vcpus": 1}
        if cpus["boot_vcpus"] > cpus["max_vcpus"]:
            raise ApiFailure(
                500, "Error creating VM", "Max vCPUs lower than boot vCPUs (invalid config)"
            )
        if cpus["max_vcpus"] > 255:
            raise ApiFailure(500, "Error creating VM", "max_vcpus must fit in a u8")
        memory = cfg.get("memory") or {}
        if (cfg.get("fs") or any(v.get("vhost_user") for v in cfg.get("disks") or [])) and not (
            memory.get("shared") or memory.get("hugepages")
        ):
            raise ApiFailure(
                500,
                "Error creating VM",
                "Using vhost-user requires using shared memory or huge pages",
            )
        ids: set[str] = set()
        for kind in ("disks", "net", "fs", "pmem", "devices"):
            for dev in cfg.get(kind) or []:
                dev_id = dev.get("id")
                if dev_id and dev_id in ids:
                    raise ApiFailure(500, "Error creating VM", f"Duplicated device id: {dev_id}")
                if dev_id:
                    ids.add(dev_id)
        payload = cfg.get("payload") or {}
        if not payload.get("kernel") and not payload.get("firmware"):
            raise ApiFailure(500, "Error creating VM", "No kernel or firmware in the payload")

    def do_vm_boot(self, _body: Any) -> Reply:
        cfg = self._need_vm("booting VM")
        if self.state != "Created":
            raise ApiFailure(500, "Error booting VM", f"Invalid VM state transition: {self.state}")
        self._activate(cfg)
        self.state = "Running"
        return 204, None

    def _activate(self, cfg: dict[str, Any]) -> None:
        """What the real VMM does when it builds devices: open files, bind and connect sockets."""
        payload = cfg.get("payload") or {}
        for key in ("kernel", "initramfs", "firmware"):
            path = payload.get(key)
            if path and not os.path.isfile(path):
                raise ApiFailure(500, "Error booting VM", f"Cannot open {key} {path}")
        try:
            for disk in cfg.get("disks") or []:
                self._open_disk(disk)
            for pmem in cfg.get("pmem") or []:
                if not os.path.exists(pmem["file"]):
                    raise ApiFailure(500, "Error booting VM", f"Cannot open pmem {pmem['file']}")
            for dev in cfg.get("devices") or []:
                self._check_vfio(dev)
            serial = cfg.get("serial") or {}
            if serial.get("mode") == "Socket":
                self._listen(serial.get("socket", ""), "serial")
            vsock = cfg.get("vsock")
            if vsock:
                self._listen(vsock["socket"], "vsock")
            for fs in cfg.get("fs") or []:
                self._connect_fs(fs)
            for kind in ("disks", "net", "fs", "pmem", "devices"):
                for dev in cfg.get(kind) or []:
                    self._assign_slot(dev, kind)
        except ApiFailure:
            self._release()
            raise
        cpus = cfg.get("cpus") or {"boot_vcpus": 1}
        self._set_vcpus(cpus["boot_vcpus"])

    def _open_disk(self, disk: dict[str, Any]) -> None:
        if disk.get("vhost_user"):
            return
        path = disk.get("path")
        if not path or not os.path.exists(path):
            raise ApiFailure(500, "Error adding disk", f"Failed to open disk image {path}")

    def _check_vfio(self, dev: dict[str, Any]) -> None:
        path = dev.get("path")
        if not path or not os.path.exists(path):
            raise ApiFailure(500, "Error adding device", f"Failed to open VFIO device {path}")

    def _listen(self, path: str, what: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(4)
        except OSError as e:
            sock.close()
            raise ApiFailure(
                500, "Error booting VM", f"Cannot bind {what} socket {path}: {e}"
            ) from e
        self.listeners.append((sock, path))
        if what == "vsock":
            threading.Thread(target=_refuse_vsock, args=(sock,), daemon=True).start()

    def _connect_fs(self, fs: dict[str, Any]) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(fs["socket"])
        except OSError as e:
            sock.close()
            raise ApiFailure(
                500,
                "Error adding fs",
                f"Failed connecting to vhost-user socket {fs['socket']}: {e}",
            ) from e
        self.fs_conns[fs.get("id") or fs["tag"]] = sock

    def _assign_slot(self, dev: dict[str, Any], kind: str) -> str:
        if not dev.get("id"):
            dev["id"] = f"_{kind.rstrip('s')}{self.counter}"
            self.counter += 1
        used = set(self.slots.values())
        slot = next(s for s in range(1, 32) if s not in used)
        self.slots[dev["id"]] = slot
        return f"0000:00:{slot:02x}.0"

    def _set_vcpus(self, n: int) -> None:
        while len(self.vcpus) < n:
            t = VcpuThread(len(self.vcpus))
            t.start()
            t.named.wait()  # answer only once /proc shows the thread under its name
            self.vcpus.append(t)
        while len(self.vcpus) > n:
            t = self.vcpus.pop()
            t.stop_event.set()
            t.join()
            # join() returns before the OS thread is gone: answer only once /proc no
            # longer lists it, as the real VMM's threads are gone when it answers.
            task = f"/proc/self/task/{t.native_id}"
            deadline = time.monotonic() + 5
            while os.path.exists(task) and time.monotonic() < deadline:
                time.sleep(0.001)

    def _release(self) -> None:
        self._set_vcpus(0)
        for sock, path in self.listeners:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.listeners.clear()
        for conn in self.fs_conns.values():
            conn.close()
        self.fs_conns.clear()
        self.slots.clear()

    def _stop_vm(self) -> None:
        self._release()
        if self.state in ("Running", "Paused"):
            self.state = "Shutdown"

    def do_vm_info(self, _body: Any) -> Reply:
        cfg = self._need_vm("getting VM info")
        memory = cfg.get("memory") or {}
        info: dict[str, Any] = {
            "config": cfg,
            "state": self.state,
            "memory_actual_size": int(memory.get("size", 0))
            + int(memory.get("hotplugged_size", 0)),
            "device_tree": {
                dev_id: {"id": dev_id, "children": [], "pci_bdf": f"0000:00:{slot:02x}.0"}
                for dev_id, slot in self.slots.items()
            },
        }
        self.spec.validate_value({"$ref": "#/components/schemas/VmInfo"}, info, "vm.info reply")
        return 200, info

    def do_vm_shutdown(self, _body: Any) -> Reply:
        self._need_vm("shutting down VM")
        if self.state not in ("Running", "Paused"):
            raise ApiFailure(500, "Error shutting down VM", "VM is not running")
        self._stop_vm()
        return 204, None

    def do_vm_delete(self, _body: Any) -> Reply:
        self._stop_vm()
        self.config = None
        self.state = ""
        return 204, None

    def do_vm_reboot(self, _body: Any) -> Reply:
        self._need_vm("rebooting VM")
        if self.state != "Running":
            raise ApiFailure(500, "Error rebooting VM", "VM is not running")
        return 204, None

    def do_vm_power_button(self, _body: Any) -> Reply:
        self._need_vm("triggering power button")
        if self.state != "Running":
            raise ApiFailure(500, "Error triggering power button", "VM is not running")
        return 204, None

    def do_vm_pause(self, _body: Any) -> Reply:
        self._need_vm("pausing VM")
        if self.state != "Running":
            raise ApiFailure(
                500, "Error pausing VM", f"Invalid transition from {self.state} to Paused"
            )
        self.state = "Paused"
        return 204, None

    def do_vm_resume(self, _body: Any) -> Reply:
        self._need_vm("resuming VM")
        if self.state != "Paused":
            raise ApiFailure(
                500, "Error resuming VM", f"Invalid transition from {self.state} to Running"
            )
        self.state = "Running"
        return 204, None

    # -- resize ----------------------------------------------------------------------------
    def do_vm_resize(self, body: dict[str, Any]) -> Reply:
        cfg = self._need_vm("resizing VM")
        if "desired_vcpus" in body:
            cpus = cfg.setdefault("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
            want = body["desired_vcpus"]
            if want > cpus["max_vcpus"]:
                raise ApiFailure(
                    500,
                    "Error resizing VM",
                    f"Desired vCPUs {want} exceeds max vCPUs {cpus['max_vcpus']}",
                )
            cpus["boot_vcpus"] = want
            if self.state in ("Running", "Paused"):
                self._set_vcpus(want)
        if "desired_ram" in body:
            memory = cfg.setdefault("memory", {"size": 512 << 20})
            want = body["desired_ram"]
            size = int(memory["size"])
            limit = size + int(memory.get("hotplug_size", 0))
            current = size + int(memory.get("hotplugged_size", 0))
            if not memory.get("hotplug_size"):
                raise ApiFailure(500, "Error resizing VM", "Memory resize is not enabled")
            if want > limit or want < size:
                raise ApiFailure(
                    500, "Error resizing VM", f"Invalid desired RAM {want} (range {size}..{limit})"
                )
            if want < current and memory.get("hotplug_method", "Acpi") == "Acpi":
                raise ApiFailure(500, "Error resizing VM", "ACPI memory hotplug cannot shrink")
            memory["hotplugged_size"] = want - size
        return 204, None

    # -- hotplug ---------------------------------------------------------------------------
    def _hotplug(self, kind: str, body: dict[str, Any], check: Any = None) -> Reply:
        cfg = self._need_vm(f"adding {kind}", status=404)
        dev_id = body.get("id")
        known = {
            d.get("id") for k in ("disks", "net", "fs", "pmem", "devices") for d in cfg.get(k) or []
        }
        if dev_id and dev_id in known:
            raise ApiFailure(409, f"Error adding {kind}", f"Identifier {dev_id} is not unique")
        if check is not None:
            check(body)
        entry = copy.deepcopy(body)
        if self.state not in ("Running", "Paused"):
            cfg.setdefault(kind, []).append(entry)  # cold add: part of the config at boot
            return 204, None
        bdf = self._assign_slot(entry, kind)
        cfg.setdefault(kind, []).append(entry)
        return 200, {"id": entry["id"], "bdf": bdf}

    def do_vm_add_disk(self, body: dict[str, Any]) -> Reply:
        return self._hotplug("disks", body, self._open_disk)

    def do_vm_add_net(self, body: dict[str, Any]) -> Reply:
        return self._hotplug("net", body)

    def do_vm_add_device(self, body: dict[str, Any]) -> Reply:
        return self._hotplug("devices", body, self._check_vfio)

    def do_vm_add_fs(self, body: dict[str, Any]) -> Reply:
        cfg = self._need_vm("adding fs", status=404)
        if not (cfg.get("memory") or {}).get("shared"):
            raise ApiFailure(
                500,
                "Error adding fs",
                "Using vhost-user requires using shared memory or huge pages",
            )

        def connect(fs: dict[str, Any]) -> None:
            if self.state in ("Running", "Paused"):
                self._connect_fs(fs)

        return self._hotplug("fs", body, connect)

    def do_vm_remove_device(self, body: dict[str, Any]) -> Reply:
        cfg = self._need_vm("removing device", status=404)
        dev_id = body.get("id")
        for kind in ("disks", "net", "fs", "pmem", "devices"):
            devs = cfg.get(kind) or []
            for dev in devs:
                if dev.get("id") == dev_id:
                    devs.remove(dev)
                    self.slots.pop(str(dev_id), None)
                    conn = self.fs_conns.pop(str(dev_id), None)
                    if conn is not None:
                        conn.close()
                    return 204, None
        raise ApiFailure(404, "Error removing device", f"No device with id {dev_id}")

    # -- snapshot / restore ----------------------------------------------------------------
    def do_vm_snapshot(self, body: dict[str, Any]) -> Reply:
        cfg = self._need_vm("snapshotting VM")
        if self.state != "Paused":
            raise ApiFailure(500, "Error snapshotting VM", "VM is not paused")
        dest = _file_url(body.get("destination_url", ""), "Error snapshotting VM")
        if not os.path.isdir(dest):
            raise ApiFailure(500, "Error snapshotting VM", f"Directory {dest} does not exist")
        with open(os.path.join(dest, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        with open(os.path.join(dest, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"fake": True, "vcpus": len(self.vcpus)}, f)
        with open(os.path.join(dest, "memory-ranges"), "wb") as f:
            f.write(b"fake guest memory\n")
        return 204, None

    def do_vm_restore(self, body: dict[str, Any]) -> Reply:
        if self.config is not None:
            raise ApiFailure(500, "Error restoring VM", "VM is already created")
        src = _file_url(body["source_url"], "Error restoring VM")
        try:
            with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
            with open(os.path.join(src, "state.json"), encoding="utf-8") as f:
                json.load(f)
            if not os.path.isfile(os.path.join(src, "memory-ranges")):
                raise OSError(f"{src}/memory-ranges is missing")
        except (OSError, ValueError) as e:
            raise ApiFailure(500, "Error restoring VM", f"Cannot read snapshot: {e}") from e
        try:
            self.spec.validate_value(
                {"$ref": "#/components/schemas/VmConfig"}, cfg, "snapshot config.json"
            )
        except SpecError as e:
            raise ApiFailure(500, "Error restoring VM", str(e)) from e
        self._check_config(cfg)
        self._activate(cfg)
        self.config = cfg
        self.state = "Running" if body.get("resume") else "Paused"
        return 204, None


def _refuse_vsock(listener: socket.socket) -> None:
    """Hybrid vsock with no guest listening: read the `CONNECT <port>` line, then hang up,
    as the real VMM does when the guest port is closed (the fake runs no guest)."""
    name_thread("vsock-proxy")
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # the listener was closed: the VM is gone
        with conn:
            conn.settimeout(2.0)
            with contextlib.suppress(OSError):
                conn.recv(64)


def _file_url(url: str, what: str) -> str:
    if not url.startswith("file://"):
        raise ApiFailure(500, what, f"Unsupported URL {url!r} (file:// only)")
    return url[len("file://") :]
