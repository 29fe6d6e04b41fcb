#!/usr/bin/env bash
# Before and after, in one run: the same idgraph-bench workload against two
# idgraph-node binaries, alternating base and new, REPS times each, every
# repetition on a fresh data directory. Prints each repetition and, per
# binary, the median throughput and p99, context switches and fsyncs per
# operation on the node(s), then the ratio new/base of the medians.
#
#   bench/compare.sh BASE_NODE NEW_NODE [-- idgraph-bench run arguments]
#   NODES=3 SHARDS=16 REPS=3 PERSONS=2000 bench/compare.sh /tmp/node-base target/release/idgraph-node -- --workload ingest --clients 16
#
# The default workload is one node, one shard, 4 streams of 256 events in
# flight. Context switches are summed over the node's threads alive at the
# end of a repetition (threads that exited meanwhile are not counted);
# fsyncs are counted with strace when it is installed (then every figure is
# taken under strace, for base and new alike), else left out.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
base="${1:?base node binary}"
new="${2:?new node binary}"
shift 2
[[ "${1:-}" == "--" ]] && shift
args=("$@")
[[ ${#args[@]} -eq 0 ]] && args=(--workload ingest --clients 4 --stream --window 256)
NODES="${NODES:-1}"
SHARDS="${SHARDS:-1}"
REPS="${REPS:-3}"
PERSONS="${PERSONS:-2000}"
bench="${BENCH:-$root/target/release/idgraph-bench}"
[[ -x "$bench" ]] || cargo build --release -p idgraph-bench
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Context switches of a process: the sum over its threads.
ctxt() {
  local total=0 f n
  for f in /proc/"$1"/task/*/status; do
    n=$(awk '/ctxt_switches/ {s += $2} END {print s + 0}' "$f" 2>/dev/null || echo 0)
    total=$((total + n))
  done
  echo "$total"
}

# One repetition: start the nodes, run the workload, print one JSON line.
rep() {
  local bin=$1 label=$2 seed=$3 members="" ports=() endpoints="" i
  pids=()
  for i in $(seq 1 "$NODES"); do ports+=("$(free_port)"); done
  for i in $(seq 1 "$NODES"); do members+="${members:+,}$i=127.0.0.1:${ports[$((i-1))]}"; done
  for i in $(seq 1 "$NODES"); do
    local dir="$work/$label-$seed-$i"
    local node_args=(--listen "127.0.0.1:${ports[$((i-1))]}" --data-dir "$dir" --shards "$SHARDS")
    [[ $NODES -gt 1 ]] && node_args+=(--id "$i" --initial-cluster "$members")
    if command -v strace >/dev/null; then
      IDGRAPH_LOG_LEVEL=error strace -f --seccomp-bpf -c -e trace=fsync,fdatasync,sync_file_range -o "$dir.strace" \
        "$bin" "${node_args[@]}" > "$dir.out" 2> "$dir.log" &
    else
      IDGRAPH_LOG_LEVEL=error "$bin" "${node_args[@]}" > "$dir.out" 2> "$dir.log" &
    fi
    pids+=($!)
    endpoints+="${endpoints:+,}http://127.0.0.1:${ports[$((i-1))]}"
  done
  sleep 3
  # The node processes (under strace, its child).
  local nodes=() before=0 after=0 p
  for p in "${pids[@]}"; do nodes+=("$(pgrep -P "$p" || echo "$p")"); done
  for p in "${nodes[@]}"; do before=$((before + $(ctxt "$p"))); done
  local out
  out=$("$bench" run --target idgraph --endpoints "$endpoints" --persons "$PERSONS" --seed "$seed" --label "$label" --output json \
    --accuracy-sample 0 "${args[@]}")
  for p in "${nodes[@]}"; do after=$((after + $(ctxt "$p"))); done
  # SIGINT to the nodes themselves (strace passes none on): a clean stop.
  for p in "${nodes[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
  local fsyncs=0 f
  for f in "$work/$label-$seed"-*.strace; do
    [[ -f "$f" ]] && fsyncs=$((fsyncs + $(awk '/fsync|fdatasync|sync_file_range/ {s += $4} END {print s + 0}' "$f")))
  done
  python3 - "$out" "$label" $((after - before)) "$fsyncs" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); m = r["measured"]
ops = max(m["ops"], 1)
print(json.dumps({"label": sys.argv[2], "ops_per_s": m["ops_per_s"], "p99_ms": m["p99_us"] / 1000, "errors": m["errors"],
                  "ctxt_per_op": int(sys.argv[3]) / ops, "fsyncs_per_op": int(sys.argv[4]) / ops}))
PY
}

results="$work/results.jsonl"
for seed in $(seq 1 "$REPS"); do
  rep "$base" base "$seed" | tee -a "$results"
  rep "$new" new "$seed" | tee -a "$results"
done
python3 - "$results" "$NODES" "$SHARDS" "${args[*]}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n{sys.argv[2]} node(s), {sys.argv[3]} shard(s), idgraph-bench run {sys.argv[4]}; medians of {len(rows) // 2}")
med = {}
for label in ("base", "new"):
    rs = [r for r in rows if r["label"] == label]
    med[label] = {k: statistics.median(r[k] for r in rs) for k in ("ops_per_s", "p99_ms", "ctxt_per_op", "fsyncs_per_op")}
    m = med[label]
    print(f"{label:>5}: {m['ops_per_s']:,.0f} ops/s (min {min(r['ops_per_s'] for r in rs):,.0f}, max {max(r['ops_per_s'] for r in rs):,.0f}), "
          f"p99 {m['p99_ms']:.1f} ms, {m['ctxt_per_op']:.2f} context switches and {m['fsyncs_per_op']:.3f} fsyncs per op, "
          f"{sum(r['errors'] for r in rs)} errors")
b, n = med["base"], med["new"]
ratio = lambda k: n[k] / b[k] if b[k] else float("nan")
print(f"new/base: throughput {ratio('ops_per_s'):.2f}x, p99 {ratio('p99_ms'):.2f}x, context switches per op {ratio('ctxt_per_op'):.2f}x")
PY
