"""containerd's CRI plugin for tests: the plugin's configuration (runtime handler `virtc`, a
CNI bridge inside containerd's own network namespace, a locally built pause image as the
sandbox image) and a gRPC client of the CRI v1 API (tests/cri_api, generated from the vendored
api.proto) over containerd's socket."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from containerd_support import Containerd, import_image

from cri_api import api_pb2_grpc as cri_grpc
from images_support import layer

#: The containerd namespace the CRI plugin keeps its images and containers in.
K8S_NAMESPACE = "k8s.io"
PAUSE_IMAGE = "docker.io/vctest/pause:1"
RUNTIME_HANDLER = "virtc"
RUNTIME_TYPE = "io.containerd.virtc.v2"
#: Debian's containernetworking-plugins.
CNI_BIN_DIR = "/usr/lib/cni"
#: How much of containerd's log a failure shows: the last lines, each cut to a width.
LOG_LINES, LOG_WIDTH = 80, 400
PAUSE_SOURCE = Path(__file__).resolve().parent.parent / "data" / "pause" / "pause.c"


@dataclass(frozen=True)
class PodNetwork:
    """The CNI network of the test's pods: a bridge (a unique name) in containerd's namespace,
    addresses from a unique subnet, its state under containerd's directory."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network

    @classmethod
    def unique(cls) -> PodNetwork:
        tag = secrets.token_hex(4)
        octets = secrets.token_bytes(2)
        return cls(
            f"vccri-{tag}",
            f"vccri{tag}",
            ipaddress.IPv4Network(f"10.{200 + octets[0] % 50}.{octets[1]}.0/24"),
        )

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def conflist(self, data_dir: str) -> dict[str, object]:
        return {
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": data_dir,
                    },
                },
            ],
        }

    def plugin_config(self, d: str, handlers: dict[str, str] | None = None) -> str:
        """Write the network's CNI config under containerd's directory `d`; the CRI plugin's
        configuration (TOML) that uses it, with runtime handler `virtc` as the default and
        `handlers` (name -> the shim's configuration.toml, CRI's runtime option
        `ConfigPath`) beside it."""
        conf_dir = os.path.join(d, "cni", "net.d")
        os.makedirs(conf_dir)
        conf = json.dumps(self.conflist(os.path.join(d, "cni", "ipam")))
        Path(conf_dir, "10-vctest.conflist").write_text(conf)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
[{cri}.containerd]
  default_runtime_name = "{RUNTIME_HANDLER}"
[{cri}.containerd.runtimes.{RUNTIME_HANDLER}]
  runtime_type = "{RUNTIME_TYPE}"
[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{conf_dir}"
""" + "".join(
            f"""[{cri}.containerd.runtimes.{name}]
  runtime_type = "{RUNTIME_TYPE}"
[{cri}.containerd.runtimes.{name}.options]
  ConfigPath = "{path}"
"""
            for name, path in (handlers or {}).items()
        )


def pause_binary() -> bytes:
    """The pause program, built static from tests/data/pause/pause.c."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "pause")
        subprocess.run(
            ["gcc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", out, str(PAUSE_SOURCE)],
            check=True,
            capture_output=True,
        )
        return Path(out).read_bytes()


def import_pause(c: Containerd) -> str:
    """The pause image (only /pause) in the CRI plugin's namespace."""
    files = layer([("file", "pause", pause_binary(), 0o755)])
    return import_image(c, PAUSE_IMAGE, [files], K8S_NAMESPACE, Entrypoint=["/pause"])


class CriClient:
    """The CRI v1 runtime and image services on containerd's socket. A failure inside its
    `with` block carries the tail of containerd's debug log (the shims' logs included), which
    goes with containerd's directory at the fixture's end."""

    def __init__(self, c: Containerd) -> None:
        self.containerd = c
        self.channel = grpc.insecure_channel(f"unix://{c.address}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if isinstance(exc, Exception):
            # Lines cut to a width: CRI logs each container's whole OCI spec on one line.
            lines = [line[:LOG_WIDTH] for line in self.containerd.log_tail(LOG_LINES).splitlines()]
            exc.add_note(f"containerd log tail ({self.containerd.log_path}):\n" + "\n".join(lines))
