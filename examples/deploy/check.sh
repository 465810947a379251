#!/usr/bin/env bash
# Checks what can be checked without a cluster or a container engine:
# - the Kubernetes manifests against the Kubernetes JSON schemas (kubernetes-validate, which
#   ships them; `pip install kubernetes-validate`), and the KEDA ScaledObject against KEDA's
#   CRD schema when KEDA_CRD points at keda.sh_scaledobjects.yaml (from KEDA's repository or
#   a release), else its nats-jetstream trigger against the scaler's documented parameters;
# - the systemd unit with `systemd-analyze verify`, when present;
# - the embedded mailroom.toml files with `mailroom validate` (MAILROOM=path to the binary,
#   MODULES=directory of built modules; skipped without them).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 - "$here/kubernetes/mailroom.yaml" <<'PY'
import os, subprocess, sys, tempfile
import yaml

path = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
core = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
keda = [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
    yaml.safe_dump_all(core, f)
subprocess.run(["kubernetes-validate", "--strict", "-k", "1.33.0", f.name], check=True)
print(f"{len(core)} core resources valid against the Kubernetes 1.33 schemas (strict)")

crd = os.environ.get("KEDA_CRD")
for obj in keda:
    assert obj["kind"] == "ScaledObject", obj["kind"]
    if crd:
        import jsonschema
        spec = yaml.safe_load(open(crd))
        version = obj["apiVersion"].split("/")[1]
        schema = next(v for v in spec["spec"]["versions"] if v["name"] == version)
        root = schema["schema"]["openAPIV3Schema"]
        jsonschema.validate(obj, root)
        # Like kubectl --validate=strict: a field the CRD does not know would be pruned.
        def known(value, node, where):
            props = node.get("properties")
            if isinstance(value, dict) and props is not None:
                for k, v in value.items():
                    assert k in props, f"{where}.{k} is not a field of the CRD"
                    known(v, props[k], f"{where}.{k}")
            if isinstance(value, list) and "items" in node:
                for i, v in enumerate(value):
                    known(v, node["items"], f"{where}[{i}]")
        known(obj["spec"], root["properties"]["spec"], "spec")
        print(f"ScaledObject {obj['metadata']['name']} valid against {crd}")
    allowed = {"natsServerMonitoringEndpoint", "account", "stream", "consumer",
               "lagThreshold", "activationLagThreshold", "useHttps"}
    required = {"natsServerMonitoringEndpoint", "stream", "consumer", "lagThreshold"}
    for t in obj["spec"]["triggers"]:
        assert t["type"] == "nats-jetstream", t["type"]
        keys = set(t["metadata"])
        assert keys <= allowed, f"unknown trigger parameters {keys - allowed}"
        assert required <= keys, f"missing trigger parameters {required - keys}"
        assert all(isinstance(v, str) for v in t["metadata"].values()), "KEDA wants strings"
    print(f"ScaledObject {obj['metadata']['name']}: nats-jetstream trigger parameters known")
    target = obj["spec"]["scaleTargetRef"]["name"]
    assert any(d["kind"] == "Deployment" and d["metadata"]["name"] == target for d in core), target
PY
if command -v systemd-analyze >/dev/null; then
  # The unit names /usr/local/bin/mailroom; verify checks the file's syntax and directives.
  # A missing binary is expected here; any other finding (unknown keys, bad values) fails.
  findings="$(systemd-analyze verify "$here/mailroom.service" 2>&1 \
    | grep -v "Command /usr/local/bin/mailroom is not executable" || true)"
  if [ -n "$findings" ]; then
    echo "$findings" >&2
    exit 1
  fi
  echo "systemd unit verified"
fi
if [ -n "${MAILROOM:-}" ] && [ -n "${MODULES:-}" ]; then
  tmp="$(mktemp -d)"
  mkdir -p "$tmp/modules" && cp "$MODULES"/*.wasm "$tmp/modules/"
  cp "$here/mailroom.toml" "$tmp/"
  python3 -c 'import yaml,sys; print(yaml.safe_load_all(open(sys.argv[1])).__next__()["data"]["mailroom.toml"].replace("/opt/mailroom/modules/", "modules/"))' \
    "$here/kubernetes/mailroom.yaml" > "$tmp/k8s.toml"
  XDG_CACHE_HOME="$tmp/cache" "$MAILROOM" validate --config "$tmp/mailroom.toml"
  XDG_CACHE_HOME="$tmp/cache" "$MAILROOM" validate --config "$tmp/k8s.toml"
fi
