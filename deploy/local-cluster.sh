#!/usr/bin/env bash
# Starts (or stops) a three-node idgraph cluster on loopback.
#   deploy/local-cluster.sh start [BASE_PORT]   # default 50061: nodes on 50061..50063
#   deploy/local-cluster.sh status
#   deploy/local-cluster.sh stop
# Data and logs go to ./idgraph-cluster/node-N/. Uses target/release/idgraph-node
# (built if missing).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$PWD/idgraph-cluster"
bin="$root/target/release/idgraph-node"
cmd="${1:-start}"
base="${2:-50061}"

case "$cmd" in
  start)
    [[ -x "$bin" ]] || cargo build --release --bin idgraph-node --manifest-path "$root/Cargo.toml"
    members="1=127.0.0.1:$base,2=127.0.0.1:$((base + 1)),3=127.0.0.1:$((base + 2))"
    for i in 1 2 3; do
      mkdir -p "$dir/node-$i"
      if [[ -f "$dir/node-$i/pid" ]] && kill -0 "$(cat "$dir/node-$i/pid")" 2>/dev/null; then
        echo "node $i already running"; continue
      fi
      "$bin" --id "$i" --listen "127.0.0.1:$((base + i - 1))" --data-dir "$dir/node-$i/data" \
        --initial-cluster "$members" > "$dir/node-$i/stdout.log" 2> "$dir/node-$i/stderr.log" &
      echo $! > "$dir/node-$i/pid"
      echo "node $i: pid $!, 127.0.0.1:$((base + i - 1))"
    done
    echo "try: IDGRAPH_ENDPOINT=http://127.0.0.1:$base idgraphctl cluster status"
    ;;
  status)
    for i in 1 2 3; do
      if [[ -f "$dir/node-$i/pid" ]] && kill -0 "$(cat "$dir/node-$i/pid")" 2>/dev/null; then
        echo "node $i: running (pid $(cat "$dir/node-$i/pid"))"
      else
        echo "node $i: stopped"
      fi
    done
    ;;
  stop)
    for i in 1 2 3; do
      if [[ -f "$dir/node-$i/pid" ]]; then
        kill "$(cat "$dir/node-$i/pid")" 2>/dev/null || true
        rm -f "$dir/node-$i/pid"
      fi
    done
    echo "stopped (data kept in $dir)"
    ;;
  *)
    echo "usage: $0 start [BASE_PORT] | status | stop" >&2; exit 2 ;;
esac
