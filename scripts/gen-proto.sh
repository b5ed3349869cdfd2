#!/bin/sh
# Regenerate the Python code of src/virtcontainers/factory/rpc/cache.proto and of the vendored
# containerd/ttrpc and CRI protos (third_party/protos; grpcio-tools, from the
# dev extra). The generated files are checked in; run this after editing the .proto.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m grpc_tools.protoc -I src \
    --python_out=src --pyi_out=src --grpc_python_out=src \
    src/virtcontainers/factory/rpc/cache.proto
echo "generated src/virtcontainers/factory/rpc/cache_pb2.py, cache_pb2.pyi, cache_pb2_grpc.py"
# The vendored protos (containerd shim, CRI), unchanged under third_party/protos.
"$PYTHON" scripts/gen_vendored_proto.py
