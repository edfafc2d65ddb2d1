#!/usr/bin/env bash
# Regenerate the Python code of turbofs/proto/*.proto (messages and their type stubs).
# The gRPC method tables are built at run time from the service descriptors
# (turbofs/proto/__init__.py), so no *_pb2_grpc.py is generated.
# Needs grpcio-tools (the dev extra). Run from anywhere.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PY="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
rm -f turbofs/proto/*_pb2.py turbofs/proto/*_pb2.pyi
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. turbofs/proto/*.proto
echo "generated: $(ls turbofs/proto/*_pb2.py | tr '\n' ' ')"
