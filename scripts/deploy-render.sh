#!/usr/bin/env bash
# Renders a kustomization of deploy/k8s to stdout with the pinned kustomize. SPEC is a directory
# under deploy/k8s (`overlays/cpu`), optionally followed by components to add, joined with `+`
# (`overlays/gpu+auth+tls+servicemonitor`), as a user's own overlay would combine them.
# `--json` prints the objects as one JSON array instead of YAML, for tests that read the
# manifests (tests/tests/deploy_manifests.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 DIR_UNDER_deploy/k8s[+COMPONENT...] [--json]" >&2; exit 2; }
[ $# -ge 1 ] || usage
IFS='+' read -r -a parts <<<"$1"
dir="deploy/k8s/${parts[0]}"
[ -f "$dir/kustomization.yaml" ] || { echo "no kustomization in $dir" >&2; exit 2; }
TOOLS="$(scripts/setup-deploy-tools.sh)"

if [ "${#parts[@]}" -gt 1 ]; then
  # kustomize accepts only relative paths: the combining kustomization lives in the target dir.
  combo="target/deploy/combos/$(tr '/+' '__' <<<"$1")"
  mkdir -p "$combo"
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources: [../../../../$dir]"
    echo "components:"
    for c in "${parts[@]:1}"; do
      [ -f "deploy/k8s/components/$c/kustomization.yaml" ] || { echo "no component $c" >&2; exit 2; }
      echo "  - ../../../../deploy/k8s/components/$c"
    done
  } > "$combo/kustomization.yaml.$$"
  # Renamed into place: a concurrent render of the same SPEC never reads a half-written file.
  mv -f "$combo/kustomization.yaml.$$" "$combo/kustomization.yaml"
  dir="$combo"
fi

case "${2:-}" in
  "") "$TOOLS/bin/kustomize" build "$dir" ;;
  --json)
    "$TOOLS/bin/kustomize" build "$dir" | "$TOOLS/bin/python" -c '
import json, sys, yaml
json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout, indent=1, sort_keys=True)
' ;;
  *) usage ;;
esac
