#!/bin/sh
# Container entrypoint of idgraph-node (installed as /usr/local/bin/idgraph-entrypoint).
#
# In a Kubernetes StatefulSet every pod is named NAME-ORDINAL (idgraph-0,
# idgraph-1, ...), and that name is its hostname. From it this script derives
# what differs between pods, each only when the variable is not already set:
#
#   IDGRAPH_NODE_ID          ORDINAL + 1
#   IDGRAPH_ADVERTISE        HOSTNAME.PEER_SERVICE.NAMESPACE.svc.CLUSTER_DOMAIN:PORT
#   IDGRAPH_INITIAL_CLUSTER  for the first IDGRAPH_INITIAL_MEMBERS pods:
#                            1=NAME-0.<same suffix>,2=NAME-1...,...
#   IDGRAPH_JOIN             for pods beyond them (added by scaling up):
#                            NAME-0.<same suffix>
#
# Inputs (all optional):
#   IDGRAPH_PEER_SERVICE     headless Service of the StatefulSet (idgraph-peers)
#   POD_NAMESPACE            the pod's namespace, from the downward API (default)
#   IDGRAPH_CLUSTER_DOMAIN   the cluster's DNS domain (cluster.local)
#   IDGRAPH_PORT             the gRPC port peers dial (50051)
#   IDGRAPH_INITIAL_MEMBERS  pods that bootstrap the cluster together (3)
#
# A hostname without an ordinal (a docker compose container, a plain
# `docker run`) leaves the node's environment as given.
#
# Without a configuration file (no IDGRAPH_CONFIG, no --config argument) the
# node would listen on 127.0.0.1 and keep data in its working directory; in a
# container it listens on 0.0.0.0 and keeps data in /var/lib/idgraph instead,
# unless IDGRAPH_LISTEN / IDGRAPH_DATA_DIR say otherwise. With a file those
# come from the file (environment variables win over it).
set -eu

log() {
  printf 'idgraph-entrypoint: %s\n' "$*" >&2
}

# A Service named "idgraph" makes the kubelet inject IDGRAPH_PORT=tcp://IP:PORT
# into pods that keep service links on; only a plain number is a port here.
port="${IDGRAPH_PORT:-50051}"
case "$port" in
  '' | *[!0-9]*) port=50051 ;;
esac

has_config_arg=false
for arg in "$@"; do
  case "$arg" in
    --config | --config=*) has_config_arg=true ;;
  esac
done
if [ -z "${IDGRAPH_CONFIG:-}" ] && [ "$has_config_arg" = false ]; then
  export IDGRAPH_LISTEN="${IDGRAPH_LISTEN:-0.0.0.0:$port}"
  export IDGRAPH_DATA_DIR="${IDGRAPH_DATA_DIR:-/var/lib/idgraph}"
fi

# Docker and the kubelet put the container's hostname into the environment.
# shellcheck disable=SC3028
host="${HOSTNAME:-}"
if [ -z "$host" ] && [ -r /proc/sys/kernel/hostname ]; then
  host="$(cat /proc/sys/kernel/hostname)"
fi
host="${host%%.*}"

name="${host%-*}"
ordinal="${host##*-}"
case "$host" in
  *-*) ;;
  *) ordinal="" ;;
esac
case "$ordinal" in
  '' | *[!0-9]*) ordinal="" ;;
esac
# No leading zeros: StatefulSet ordinals have none, and sh would read them as octal.
case "$ordinal" in
  0?*) ordinal="" ;;
esac

if [ -n "$ordinal" ] && [ -n "$name" ]; then
  peer_service="${IDGRAPH_PEER_SERVICE:-idgraph-peers}"
  namespace="${POD_NAMESPACE:-default}"
  domain="${IDGRAPH_CLUSTER_DOMAIN:-cluster.local}"
  suffix="$peer_service.$namespace.svc.$domain:$port"
  members="${IDGRAPH_INITIAL_MEMBERS:-3}"
  case "$members" in
    '' | *[!0-9]* | 0)
      log "IDGRAPH_INITIAL_MEMBERS must be a number of at least 1, not '$members'"
      exit 64
      ;;
  esac

  export IDGRAPH_NODE_ID="${IDGRAPH_NODE_ID:-$((ordinal + 1))}"
  export IDGRAPH_ADVERTISE="${IDGRAPH_ADVERTISE:-$host.$suffix}"

  if [ "$ordinal" -lt "$members" ]; then
    if [ -z "${IDGRAPH_INITIAL_CLUSTER:-}" ] && [ -z "${IDGRAPH_JOIN:-}" ]; then
      cluster=""
      i=0
      while [ "$i" -lt "$members" ]; do
        cluster="$cluster${cluster:+,}$((i + 1))=$name-$i.$suffix"
        i=$((i + 1))
      done
      export IDGRAPH_INITIAL_CLUSTER="$cluster"
    fi
  elif [ -z "${IDGRAPH_JOIN:-}" ] && [ -z "${IDGRAPH_INITIAL_CLUSTER:-}" ]; then
    export IDGRAPH_JOIN="$name-0.$suffix"
  fi

  log "pod $host: node_id=$IDGRAPH_NODE_ID advertise=$IDGRAPH_ADVERTISE" \
    "initial_cluster=${IDGRAPH_INITIAL_CLUSTER:-} join=${IDGRAPH_JOIN:-}"
fi

exec idgraph-node "$@"
