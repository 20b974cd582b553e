#!/usr/bin/env bash
# Renders every deployable form of deploy/k8s (the cpu and gpu overlays, each also with the
# opt-in components), validates each object against the Kubernetes schemas of the oldest and
# newest supported versions, and runs checkov on the rendered manifests and deploy/Dockerfile.
# Fails on any invalid object or any failed check that is not skipped with a reason
# (`checkov.io/skipN: CKV_K8S_xx=reason` annotations, `# checkov:skip=` in the Dockerfile).
# Rendered files land in target/deploy/rendered/. Runs offline once the tools are installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1.30: the first release whose preStop `sleep` action is on by default (generator drain).
K8S_VERSIONS="1.30.0 1.37.0"
TOOLS="$(scripts/setup-deploy-tools.sh)"
OUT=target/deploy
rm -rf "$OUT/rendered"
mkdir -p "$OUT/rendered"

render() { # name spec
  scripts/deploy-render.sh "$2" > "$OUT/rendered/$1.yaml"
  echo "rendered $2 -> $OUT/rendered/$1.yaml"
}

render cpu overlays/cpu
render gpu overlays/gpu
render cpu-secure overlays/cpu+auth+tls+namespace
render gpu-all overlays/gpu+auth+tls+servicemonitor+namespace+gpu-node-affinity

for v in $K8S_VERSIONS; do
  # ServiceMonitor and ScaledObject are CRDs without a bundled schema: reported as warnings,
  # not validated.
  "$TOOLS/bin/kubernetes-validate" --strict --quiet -k "$v" "$OUT"/rendered/*.yaml
  echo "kubernetes-validate $v: all objects valid"
done

# Each skip must say why.
"$TOOLS/bin/python" - "$OUT"/rendered/*.yaml <<'PY'
import re, sys, yaml
bad = []
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        for key, value in (doc.get("metadata", {}).get("annotations") or {}).items():
            if key.startswith("checkov.io/skip") and not re.fullmatch(r"CKV2?_[A-Z0-9_]+=\S.{9,}", value):
                bad.append(f"{path}: {doc['kind']}/{doc['metadata']['name']}: {key}: {value!r}")
if bad:
    sys.exit("checkov skips without a reason:\n" + "\n".join(bad))
PY

run_checkov() { # framework file
  local log
  log=$("$TOOLS/bin/checkov" --framework "$1" -f "$2" --skip-download --compact --quiet 2>&1) || {
    echo "$log" >&2
    echo "checkov: failed checks in $2" >&2
    return 1
  }
  grep -qE "Passed checks: [1-9]" <<<"$log" || { echo "$log" >&2; echo "checkov ran no check on $2" >&2; return 1; }
  echo "checkov $2: $(grep -oE 'Passed checks: [0-9]+, Failed checks: [0-9]+, Skipped checks: [0-9]+' <<<"$log")"
}
for f in "$OUT"/rendered/*.yaml; do run_checkov kubernetes "$f"; done
run_checkov dockerfile deploy/Dockerfile
echo "deploy check passed"
