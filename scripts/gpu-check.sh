#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, for a session that is lent one. They show that libtorch's
# CUDA half loads at run time (the binaries do not link it; services/model/src/cuda_backend.rs)
# and measure decoding on CUDA: GPT-2 small and the 4 × 256 model through the engine, one
# stream, beside HF generate() and a lean PyTorch loop on the same GPU, and GPT-2 small through
# the gRPC server, one stream and 64 concurrent streams.
#
# The GPU machine builds nothing, so this runs in two steps:
#   scripts/gpu-check.sh prepare   here: release build; the stripped benchmark and the GPT-2
#                                  tokenizer go to target/gpu-check (ignored by git)
#   scripts/gpu-check.sh run       there, in the repository root, with target/gpu-check
#                                  carried; it uses the torch of $SYNOPSIS_PYTHON (python3 by
#                                  default). DEVICE=cpu runs the same steps on a CPU, STREAMS=N
#                                  changes the 64 concurrent streams; further
#                                  arguments go to bench-generate (e.g. --new-tokens 8).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=target/gpu-check

case "${1:-}" in
prepare)
    cargo build --release -p synopsis-bench --bin bench-generate
    mkdir -p "$KIT"
    # Debug info is most of the binary's size, and the carried tree is capped at 64 MiB.
    objcopy --strip-debug target/release/bench-generate "$KIT/bench-generate"
    rm -rf "$KIT/gpt2_tokenizer"
    cp -r tests/fixtures/gpt2_tokenizer "$KIT/"
    du -sh "$KIT"
    ;;
run)
    shift
    python="${SYNOPSIS_PYTHON:-python3}"
    torch_lib="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    # The binaries' RUNPATH names the build machine's libtorch; this machine's comes first.
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export SYNOPSIS_PYTHON="$python"
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
    "$python" -c 'import torch; print("torch", torch.__version__, "CUDA available:", torch.cuda.is_available())'
    "$KIT/bench-generate" --device "${DEVICE:-cuda}" --tokenizer "$KIT/gpt2_tokenizer" --streams "${STREAMS:-64}" --rounds 1 "$@"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
