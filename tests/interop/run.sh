#!/usr/bin/env bash
# Generates a Python client from proto/ with grpcio-tools, starts a real
# idgraph-node on a free port, and calls every RPC with the generated stubs.
# Usage: tests/interop/run.sh [path/to/idgraph-node]  (default: target/debug)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
node_bin="${1:-$root/target/debug/idgraph-node}"
venv="$root/target/interop-venv"
work="$(mktemp -d)"
node_pid=""
cleanup() {
  if [[ -n "$node_pid" ]]; then kill "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import grpc_tools, grpc_health" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/interop/requirements.txt"
fi

mkdir -p "$work/gen"
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto/proto" \
  --python_out="$work/gen" --grpc_python_out="$work/gen" \
  "$root/proto/proto/idgraph/v1/idgraph.proto" "$root/proto/proto/idgraph/v1/admin.proto"

"$node_bin" --listen 127.0.0.1:0 --data-dir "$work/data" --log-level warn > "$work/node.out" &
node_pid=$!
for _ in $(seq 1 100); do
  if [[ -s "$work/node.out" ]]; then break; fi
  sleep 0.1
done
addr="$(head -1 "$work/node.out" | awk '{print $4}')"
[[ -n "$addr" ]] || { echo "node did not report its address" >&2; exit 1; }

PYTHONPATH="$work/gen" "$venv/bin/python" "$root/tests/interop/python_client.py" "$addr"
