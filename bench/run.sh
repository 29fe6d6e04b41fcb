#!/usr/bin/env bash
# Runs the side-by-side comparison on this machine and writes BENCHMARKS.md
# (and bench/results/*.svg) from the medians of several repetitions.
#
#   bench/run.sh                        # default size, every stage
#   PERSONS=2000 REPS=1 bench/run.sh    # a quick look
#   STAGES="sled postgres" APPEND=1 bench/run.sh   # some stages, added to the last results
#   MEASURED_COMMIT=abc1234 python3 bench/report.py target/bench/results.jsonl PERSONS REPS > BENCHMARKS.md   # render again
#
# Systems: idgraph on one node (one shard; unary and streaming), idgraph on
# three nodes on loopback (replication factor 3; 16 shards, and 1 shard),
# GetProfile at half its maximum rate on one node and on three,
# PostgreSQL 15 doing online resolution and batch stitching by label
# propagation (installed from Debian's packages if missing,
# started in target/bench/pg with fsync and synchronous_commit on), and
# sled alone as the storage ceiling, and etcd 3.4 with three members on
# loopback (Debian's etcd-server; the client is built with the `etcd`
# feature, which needs protoc: Debian's protobuf-compiler). The growth stage
# ingests a larger world (GROWTH_PERSONS) into one node in GROWTH_STEPS
# parts, with the node's memory and disk after each.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PERSONS="${PERSONS:-20000}"
REPS="${REPS:-3}"
CLIENTS="${CLIENTS:-16}"
PROFILE="${PROFILE:-release}"
STAGES="${STAGES:-single cluster latency sled postgres etcd growth}"
GROWTH_PERSONS="${GROWTH_PERSONS:-150000}"
GROWTH_STEPS="${GROWTH_STEPS:-10}"
work="$root/target/bench"
results="$work/results.jsonl"
mkdir -p "$work"
[[ "${APPEND:-0}" == 1 ]] || : > "$results"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
pids=()
etcd_pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  for p in "${etcd_pids[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  if [[ -n "${pgbin:-}" && -d "$work/pg" ]]; then "$pgbin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

sudo_cmd=""; [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
apt_install() { DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q "$@" >/dev/null; }

flag=""; [[ "$PROFILE" == release ]] && flag="--release"
features=""
if stage etcd; then
  command -v protoc >/dev/null || apt_install protobuf-compiler
  [[ -x /usr/bin/etcd ]] || apt_install etcd-server
  features="--features idgraph-bench/etcd"
fi
cargo build $flag -p idgraph-node -p idgraph-bench $features
bin="$root/target/$PROFILE"
bench="$bin/idgraph-bench"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# idgraph nodes: start_nodes N SHARDS -> endpoints in $endpoints
start_nodes() {
  local n=$1 shards=$2 members="" ports=()
  for i in $(seq 1 "$n"); do ports+=("$(free_port)"); done
  for i in $(seq 1 "$n"); do members+="${members:+,}$i=127.0.0.1:${ports[$((i-1))]}"; done
  endpoints=""
  for i in $(seq 1 "$n"); do
    local dir="$work/node$n-$i"; rm -rf "$dir"
    local args=(--listen "127.0.0.1:${ports[$((i-1))]}" --data-dir "$dir" --shards "$shards")
    [[ $n -gt 1 ]] && args+=(--id "$i" --initial-cluster "$members")
    IDGRAPH_LOG_LEVEL=error "$bin/idgraph-node" "${args[@]}" > "$dir.out" 2> "$dir.log" &
    pids+=($!)
    endpoints+="${endpoints:+,}http://127.0.0.1:${ports[$((i-1))]}"
  done
  sleep 3
}
stop_nodes() { for p in "${pids[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done; pids=(); sleep 1; }

run() { # label, then idgraph-bench run arguments
  local label=$1; shift
  for rep in $(seq 1 "$REPS"); do
    "$bench" run --persons "$PERSONS" --seed "$rep" --label "$label" --output json "$@" >> "$results"
  done
}

if stage single; then
echo "== idgraph, one node, one shard"
for w in ingest merge-heavy lookup; do
  start_nodes 1 1; run "1 node" --target idgraph --endpoints "$endpoints" --workload "$w" --clients "$CLIENTS"; stop_nodes
done
start_nodes 1 1; run "1 node" --target idgraph --endpoints "$endpoints" --workload ingest --clients 4 --stream --window 256; stop_nodes
start_nodes 1 1; run "1 node" --target idgraph --endpoints "$endpoints" --workload lookup --clients "$CLIENTS" --stale; stop_nodes
for c in 1 4 16 64; do
  start_nodes 1 1; run "1 node, clients" --target idgraph --endpoints "$endpoints" --workload ingest --clients "$c" --accuracy-sample 0; stop_nodes
done
fi

if stage cluster; then
echo "== idgraph, three nodes, 16 shards"
for w in ingest merge-heavy; do
  start_nodes 3 16; run "3 nodes" --target idgraph --endpoints "$endpoints" --workload "$w" --clients "$CLIENTS"; stop_nodes
done
echo "== idgraph, three nodes, 1 shard"
start_nodes 3 1; run "3 nodes, 1 shard" --target idgraph --endpoints "$endpoints" --workload ingest --clients "$CLIENTS"; stop_nodes
# The same with clients spread over the nodes, each forwarding to the
# leader what it does not lead (a client that does not route).
start_nodes 3 1; run "3 nodes, 1 shard, spread" --target idgraph --endpoints "$endpoints" --workload ingest --clients "$CLIENTS" --routing spread; stop_nodes
start_nodes 3 1; run "3 nodes, 1 shard" --target idgraph --endpoints "$endpoints" --workload ingest --clients 4 --stream --window 256; stop_nodes
start_nodes 3 1; run "3 nodes, 1 shard, clients" --target idgraph --endpoints "$endpoints" --workload ingest --clients 64 --accuracy-sample 0; stop_nodes
fi

# The median ops/s of this run's rows with LABEL and WORKLOAD, at full load
# (no --rate), or nothing.
median_rate() {
  python3 - "$results" "$1" "$2" <<'PY'
import json, statistics, sys
path, label, workload = sys.argv[1:]
rows = [json.loads(line) for line in open(path) if line.strip()]
xs = [r["measured"]["ops_per_s"] for r in rows
      if r["label"] == label and r["workload"] == workload and not r["stream"] and not r["stale"] and r.get("rate") is None]
print(round(statistics.median(xs)) if xs else "")
PY
}

if stage latency; then
# GetProfile's latency at half the lookup workload's maximum rate (open
# loop: look-ups released at evenly spaced moments), on one node and on
# three. The maximum is this run's median at full load, measured here if
# an earlier stage did not.
echo "== GetProfile at half load, one node and three nodes on one shard"
for layout in "1 1 1 node" "3 1 3 nodes, 1 shard"; do
  read -r n shards label <<< "$layout"
  if [[ -z "$(median_rate "$label" lookup)" ]]; then
    start_nodes "$n" "$shards"; run "$label" --target idgraph --endpoints "$endpoints" --workload lookup --clients "$CLIENTS"; stop_nodes
  fi
  full="$(median_rate "$label" lookup)"
  start_nodes "$n" "$shards"
  # Eight seconds of look-ups at half the rate, for a steadier tail.
  run "$label, half load" --target idgraph --endpoints "$endpoints" --workload lookup --clients "$CLIENTS" \
    --rate "$((full / 2))" --lookups "$((full / 2 * 8))" --accuracy-sample 0
  stop_nodes
done
fi

if stage sled; then
echo "== sled alone"
rm -rf "$work/sled"; run "ceiling" --target sled --sled-dir "$work/sled" --workload ingest --clients "$CLIENTS"
fi

if stage postgres; then
echo "== PostgreSQL 15, online resolution"
pgbin="$(ls -d /usr/lib/postgresql/15/bin 2>/dev/null || true)"
if [[ -z "$pgbin" ]]; then
  apt_install postgresql-15
  pgbin=/usr/lib/postgresql/15/bin
fi
pgport="$(free_port)"
rm -rf "$work/pg"
pguser=postgres
if [[ $(id -u) -eq 0 ]]; then
  # PostgreSQL refuses to run as root: run it as the postgres user.
  mkdir -p "$work/pg" && chown postgres "$work/pg"
  as_pg() { su postgres -s /bin/bash -c "$*"; }
else
  as_pg() { bash -c "$*"; }
  pguser="$(id -un)"
fi
as_pg "$pgbin/initdb -D $work/pg -U $pguser -A trust >/dev/null"
as_pg "$pgbin/pg_ctl -D $work/pg -o '-p $pgport -k /tmp -c fsync=on -c synchronous_commit=on -c max_connections=200' -l $work/pg/postgres.log -w start >/dev/null"
pgconn="host=127.0.0.1 port=$pgport user=$pguser dbname=postgres"
for w in ingest merge-heavy lookup; do
  run "postgresql" --target postgres --pg "$pgconn" --workload "$w" --clients "$CLIENTS"
done
for c in 1 4 16 64; do
  run "postgresql, clients" --target postgres --pg "$pgconn" --workload ingest --clients "$c" --accuracy-sample 0
done
run "postgresql" --target postgres --pg "$pgconn" --workload batch
as_pg "$pgbin/pg_ctl -D $work/pg -m fast stop >/dev/null"
fi

if stage etcd; then
echo "== etcd 3.4, three members"
cports=(); pports=(); cluster=""
for i in 1 2 3; do cports+=("$(free_port)"); pports+=("$(free_port)"); done
for i in 1 2 3; do cluster+="${cluster:+,}e$i=http://127.0.0.1:${pports[$((i-1))]}"; done
etcd_eps=""
for i in 1 2 3; do
  dir="$work/etcd$i"; rm -rf "$dir"
  /usr/bin/etcd --name "e$i" --data-dir "$dir" \
    --listen-client-urls "http://127.0.0.1:${cports[$((i-1))]}" --advertise-client-urls "http://127.0.0.1:${cports[$((i-1))]}" \
    --listen-peer-urls "http://127.0.0.1:${pports[$((i-1))]}" --initial-advertise-peer-urls "http://127.0.0.1:${pports[$((i-1))]}" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token idgraph-bench \
    --log-level error > "$dir.log" 2>&1 &
  etcd_pids+=($!)
  etcd_eps+="${etcd_eps:+,}http://127.0.0.1:${cports[$((i-1))]}"
done
for _ in $(seq 1 50); do
  python3 -c "import urllib.request,sys; sys.exit(0 if b'true' in urllib.request.urlopen('http://127.0.0.1:${cports[0]}/health').read() else 1)" 2>/dev/null && break
  sleep 0.2
done
# The member leading (etcd's status names the leader's member id): idgraph's
# client sends each request to its shard's leader, so etcd is measured both
# ways too, its clients over every member and at the leader alone, and the
# report compares with the better of the two.
etcd_leader=""
for _ in $(seq 1 50); do
  for ep in ${etcd_eps//,/ }; do
    etcd_leader="$(curl -sf --max-time 2 -X POST "$ep/v3/maintenance/status" -d '{}' | python3 -c 'import json,sys; s=json.load(sys.stdin); print("yes" if s.get("leader") == s["header"].get("member_id") else "")' 2>/dev/null || true)"
    [[ "$etcd_leader" == yes ]] && { etcd_leader="$ep"; break 2; }
    etcd_leader=""
  done
  sleep 0.2
done
run "etcd" --target etcd --etcd "$etcd_eps" --workload ingest --clients "$CLIENTS"
run "etcd" --target etcd --etcd "$etcd_eps" --workload lookup --clients "$CLIENTS"
for c in 1 4 16 64; do
  run "etcd, clients" --target etcd --etcd "$etcd_eps" --workload ingest --clients "$c" --accuracy-sample 0
done
if [[ -z "$etcd_leader" ]]; then
  echo "warning: no etcd member said it leads; etcd is measured over every member only" >&2
else
  run "etcd, leader" --target etcd --etcd "$etcd_leader" --workload ingest --clients "$CLIENTS"
  for c in 16 64; do
    run "etcd, clients, leader" --target etcd --etcd "$etcd_leader" --workload ingest --clients "$c" --accuracy-sample 0
  done
fi
for p in "${etcd_pids[@]}"; do kill "$p" 2>/dev/null || true; done; etcd_pids=()
fi

if stage growth; then
echo "== idgraph, one node, growing graph ($GROWTH_PERSONS persons in $GROWTH_STEPS steps)"
start_nodes 1 1
"$bench" run --persons "$GROWTH_PERSONS" --seed 1 --label "growth" --output json --target idgraph --endpoints "$endpoints" \
  --workload ingest --clients 4 --stream --window 256 --steps "$GROWTH_STEPS" --accuracy-sample 0 \
  --watch-pid "${pids[0]}" --watch-dir "$work/node1-1" >> "$results"
stop_nodes
fi

echo "== report"
python3 bench/report.py "$results" "$PERSONS" "$REPS" > BENCHMARKS.md
echo "wrote BENCHMARKS.md and bench/results/"
