#!/usr/bin/env bash
# Renders one kustomization of deploy/k8s (e.g. `overlays/cpu`) to stdout with the pinned
# kustomize; `--json` prints the objects as one JSON array instead of YAML, for tests that read
# the manifests (tests/tests/deploy_manifests.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 KUSTOMIZATION_DIR_UNDER_deploy/k8s [--json]" >&2; exit 2; }
[ $# -ge 1 ] || usage
dir="deploy/k8s/$1"
[ -f "$dir/kustomization.yaml" ] || { echo "no kustomization in $dir" >&2; exit 2; }
TOOLS="$(scripts/setup-deploy-tools.sh)"

case "${2:-}" in
  "") "$TOOLS/bin/kustomize" build "$dir" ;;
  --json)
    "$TOOLS/bin/kustomize" build "$dir" | "$TOOLS/bin/python" -c '
import json, sys, yaml
json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout, indent=1, sort_keys=True)
' ;;
  *) usage ;;
esac
