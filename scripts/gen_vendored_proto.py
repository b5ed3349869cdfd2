"""Generate the Python modules of the vendored protos (third_party/protos): containerd's shim
and ttrpc API for the shim (src/virtcontainers/shim/proto/), the Kubernetes CRI API for the
tests' CRI client (tests/cri_api/, with gRPC stubs).

The .proto files stay byte-for-byte as upstream ships them. They carry gogoproto options (Go code
generation hints) and import gogo.proto under two different paths, which would clash in Python's
descriptor pool; so protoc first writes a descriptor set, this script drops the gogo files and
options from it and moves each file to its Python package, and protoc then generates Python from
that set. Wire names (packages, messages, fields) are unchanged.
Run through scripts/gen-proto.sh.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "third_party" / "protos"


@dataclass(frozen=True)
class Target:
    """Vendored protos generated into one Python package."""

    #: The import root the modules are generated under.
    out: Path
    #: Vendored path prefix -> module path under `out`.
    moves: dict[str, str]
    #: The .proto files to generate, in groups compiled apart (a file importing gogo.proto by
    #: its full Go path cannot share a protoc run with files importing it as gogoproto/).
    groups: tuple[tuple[str, ...], ...]
    #: Where `__init__.py` files stop (the package's existing parent).
    top: Path
    grpc: bool = False


SHIM = Target(
    out=ROOT / "src",
    moves={
        "github.com/containerd/containerd/": "virtcontainers/shim/proto/containerd/",
        "github.com/containerd/cgroups/": "virtcontainers/shim/proto/cgroups/",
        "github.com/containerd/ttrpc/": "virtcontainers/shim/proto/ttrpc/",
    },
    groups=(
        (
            "github.com/containerd/containerd/runtime/v2/task/shim.proto",
            "github.com/containerd/containerd/api/types/mount.proto",
            "github.com/containerd/containerd/api/types/task/task.proto",
            "github.com/containerd/containerd/api/events/task.proto",
            "github.com/containerd/containerd/api/services/ttrpc/events/v1/events.proto",
            "github.com/containerd/cgroups/stats/v1/metrics.proto",
            "github.com/containerd/cgroups/v2/stats/metrics.proto",
            "github.com/containerd/ttrpc/request.proto",
        ),
        ("github.com/containerd/containerd/pkg/runtimeoptions/v1/api.proto",),
    ),
    top=ROOT / "src" / "virtcontainers" / "shim",
)
CRI = Target(
    out=ROOT / "tests",
    moves={"k8s.io/cri-api/pkg/apis/runtime/v1/": "cri_api/"},
    groups=(("k8s.io/cri-api/pkg/apis/runtime/v1/api.proto",),),
    top=ROOT / "tests",
    grpc=True,
)
# Go-only option files: dropped with every option they define.
DROP = {
    "gogoproto/gogo.proto",
    "github.com/gogo/protobuf/gogoproto/gogo.proto",
    "github.com/containerd/containerd/protobuf/plugin/fieldpath.proto",
}


def moved(name: str, moves: dict[str, str]) -> str:
    for prefix, into in moves.items():
        if name.startswith(prefix):
            return f"{into}{name[len(prefix) :]}"
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


def strip(
    fds: descriptor_pb2.FileDescriptorSet, moves: dict[str, str]
) -> descriptor_pb2.FileDescriptorSet:
    out = descriptor_pb2.FileDescriptorSet()
    for f in fds.file:
        if f.name in DROP:
            continue
        g = out.file.add()
        g.CopyFrom(f)
        g.name = moved(f.name, moves)
        deps = [d for d in f.dependency if d not in DROP]
        del g.dependency[:]
        g.dependency.extend(moved(d, moves) for d in deps)
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


def generate(target: Target) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        # A proto importing gogo.proto by its full Go path finds the same vendored file there.
        alias = Path(tmp) / "github.com/gogo/protobuf/gogoproto"
        alias.mkdir(parents=True)
        (alias / "gogo.proto").symlink_to(PROTOS / "gogoproto" / "gogo.proto")
        fds = descriptor_pb2.FileDescriptorSet()
        seen: set[str] = set()
        for i, group in enumerate(target.groups):
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
        clean.write_bytes(strip(fds, target.moves).SerializeToString())
        targets = [moved(name, target.moves) for group in target.groups for name in group]
        out = target.out
        grpc = [f"--grpc_python_out={out}"] if target.grpc else []
        protoc(
            f"--descriptor_set_in={clean}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            *grpc,
            *targets,
        )
    for name in targets:
        d = (out / name).parent
        while d != target.top:
            (d / "__init__.py").touch()
            d = d.parent
    return len(targets)


def main() -> None:
    for target in (SHIM, CRI):
        n = generate(target)
        print(f"generated {n} modules under {target.top.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
