#!/usr/bin/env bash
# GetProfile latency at full and at half the maximum rate, against running
# idgraph nodes: three closed-loop lookup runs give the maximum (median),
# then three open-loop runs at half of it (--rate). Prints one line each.
#   bench/half-load.sh ENDPOINTS [extra idgraph-bench args, e.g. --stale]
#   bench/half-load.sh http://127.0.0.1:50061,http://127.0.0.1:50062,http://127.0.0.1:50063
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
endpoints="$1"; shift
bench="$root/target/release/idgraph-bench"
[[ -x "$bench" ]] || cargo build --release -p idgraph-bench --manifest-path "$root/Cargo.toml"
run() {
  "$bench" run --target idgraph --endpoints "$endpoints" --workload lookup --clients 16 --persons "${PERSONS:-2000}" \
    --accuracy-sample 0 --output json "$@" | tail -1 |
    python3 -c 'import json,sys; m=json.loads(sys.stdin.read())["measured"]; print(m["ops_per_s"], m["p50_us"]/1000, m["p99_us"]/1000, m["errors"])'
}
full=()
for seed in 1 2 3; do
  line=$(run --seed "$seed" --lookups 40000 "$@"); full+=("$line"); echo "full load, seed $seed: ops/s p50_ms p99_ms errors = $line"
done
max=$(printf '%s\n' "${full[@]}" | awk '{print $1}' | sort -n | sed -n 2p)
half=$(python3 -c "print($max / 2)")
for seed in 1 2 3; do
  echo "half load ($half/s), seed $seed: ops/s p50_ms p99_ms errors = $(run --seed "$seed" --rate "$half" --lookups "$(python3 -c "print(int($half * 8))")" "$@")"
done
