"""Generate the Python modules of the vendored containerd/ttrpc protos (third_party/protos).

The .proto files stay byte-for-byte as upstream ships them. They carry gogoproto options (Go code
generation hints) and import gogo.proto under two different paths, which would clash in Python's
descriptor pool; so protoc first writes a descriptor set, this script drops the gogo files and
options from it and moves each file under virtcontainers/shim/proto/, and protoc then generates
Python from that set. Wire names (packages, messages, fields) are unchanged.
Run through scripts/gen-proto.sh.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "third_party" / "protos"
OUT = ROOT / "src"
PACKAGE = "virtcontainers/shim/proto"

# Vendored path prefix -> place under PACKAGE.
MOVES = {
    "github.com/containerd/containerd/": "containerd/",
    "github.com/containerd/cgroups/": "cgroups/",
    "github.com/containerd/ttrpc/": "ttrpc/",
}
GENERATE = [
    "github.com/containerd/containerd/runtime/v2/task/shim.proto",
    "github.com/containerd/containerd/api/types/mount.proto",
    "github.com/containerd/containerd/api/types/task/task.proto",
    "github.com/containerd/containerd/api/events/task.proto",
    "github.com/containerd/containerd/api/services/ttrpc/events/v1/events.proto",
    "github.com/containerd/cgroups/stats/v1/metrics.proto",
    "github.com/containerd/cgroups/v2/stats/metrics.proto",
    "github.com/containerd/ttrpc/request.proto",
    "github.com/containerd/containerd/pkg/runtimeoptions/v1/api.proto",  # last: see main()
]
# Go-only option files: dropped with every option they define.
DROP = {
    "gogoproto/gogo.proto",
    "github.com/gogo/protobuf/gogoproto/gogo.proto",
    "github.com/containerd/containerd/protobuf/plugin/fieldpath.proto",
}


def moved(name: str) -> str:
    for prefix, into in MOVES.items():
        if name.startswith(prefix):
            return f"{PACKAGE}/{into}{name[len(prefix) :]}"
    return name


def clear_options(msg: descriptor_pb2.DescriptorProto) -> None:
    msg.ClearField("options")
    for field in msg.field:
        field.ClearField("options")
    for enum in msg.enum_type:
        enum.ClearField("options")
        for value in enum.value:
            value.ClearField("options")
    for nested in msg.nested_type:
        if not nested.options.map_entry:
            clear_options(nested)


def strip(fds: descriptor_pb2.FileDescriptorSet) -> descriptor_pb2.FileDescriptorSet:
    out = descriptor_pb2.FileDescriptorSet()
    for f in fds.file:
        if f.name in DROP:
            continue
        g = out.file.add()
        g.CopyFrom(f)
        g.name = moved(f.name)
        deps = [d for d in f.dependency if d not in DROP]
        del g.dependency[:]
        g.dependency.extend(moved(d) for d in deps)
        del g.weak_dependency[:]
        del g.public_dependency[:]
        g.options.ClearField("go_package")
        for ext in list(g.options.ListFields()):
            if ext[0].is_extension:
                g.options.ClearExtension(ext[0])
        g.options.Clear()
        for msg in g.message_type:
            clear_options(msg)
        for enum in g.enum_type:
            enum.ClearField("options")
            for value in enum.value:
                value.ClearField("options")
        g.ClearField("source_code_info")
    return out


def protoc(*args: str) -> None:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", *args]
    subprocess.run(cmd, check=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # runtimeoptions imports gogo.proto by its full Go path: compiled apart from the rest, the
        # same vendored file given at that path too.
        alias = Path(tmp) / "github.com/gogo/protobuf/gogoproto"
        alias.mkdir(parents=True)
        (alias / "gogo.proto").symlink_to(PROTOS / "gogoproto" / "gogo.proto")
        fds = descriptor_pb2.FileDescriptorSet()
        seen: set[str] = set()
        for i, group in enumerate((GENERATE[:-1], GENERATE[-1:])):
            raw = Path(tmp) / f"raw{i}.pb"
            protoc(
                f"-I{PROTOS}",
                f"-I{tmp}",
                "--include_imports",
                f"--descriptor_set_out={raw}",
                *group,
            )
            for f in descriptor_pb2.FileDescriptorSet.FromString(raw.read_bytes()).file:
                if f.name not in seen:
                    seen.add(f.name)
                    fds.file.add().CopyFrom(f)
        clean = Path(tmp) / "clean.pb"
        clean.write_bytes(strip(fds).SerializeToString())
        targets = [moved(name) for name in GENERATE]
        protoc(f"--descriptor_set_in={clean}", f"--python_out={OUT}", f"--pyi_out={OUT}", *targets)
    for target in targets:
        d = (OUT / target).parent
        while d != OUT / "virtcontainers" / "shim":
            (d / "__init__.py").touch()
            d = d.parent
    print(f"generated {len(targets)} modules under src/{PACKAGE}")


if __name__ == "__main__":
    main()
