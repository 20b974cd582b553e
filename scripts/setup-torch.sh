#!/usr/bin/env bash
# Creates, once per version, the Python environment whose torch wheel provides libtorch for `tch`
# (and transformers/safetensors for the interoperability tests). It lives outside the clone so
# repeated builds and CI runs on one machine reuse it. Prints the venv path.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
CACHE="${SYNOPSIS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/synopsis}"
VENV="$CACHE/torch-$TORCH_VERSION"
STAMP="$VENV/.synopsis-ready"
REQS="torch==$TORCH_VERSION transformers safetensors numpy"
# Extra pip arguments, e.g. the CPU-only torch index for the image's cpu variant
# (deploy/Dockerfile); recorded in the stamp, so a venv of another variant is not reused.
TORCH_PIP_ARGS="${TORCH_PIP_ARGS:-}"
WANT="$REQS${TORCH_PIP_ARGS:+ $TORCH_PIP_ARGS}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "$VENV"
  exit 0
fi

mkdir -p "$CACHE"
PY="${PYTHON:-python3}"
echo "setting up libtorch $TORCH_VERSION from PyPI in $VENV (one time, a few GB)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install --disable-pip-version-check -q $TORCH_PIP_ARGS $REQS >&2
"$VENV/bin/python" -c "import torch, transformers, safetensors; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__" >&2
echo "$WANT" > "$STAMP"
echo "$VENV"
