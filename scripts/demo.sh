#!/usr/bin/env bash
# The product in one command: starts a trainer and a generator on free loopback ports, trains the
# tiny preset on the embedded corpus with live progress, waits until the generator has hot-loaded
# the newest checkpoint, streams generated synopses, writes them and a loss plot to demo-output/,
# and stops both services on exit (also on Ctrl-C or an error), leaving no process behind.
set -euo pipefail
cd "$(dirname "$0")/.."

EPOCHS="${DEMO_EPOCHS:-15}"
OUT="${DEMO_OUT:-demo-output}"
BIN="${CARGO_TARGET_DIR:-target}/debug"

cargo build --workspace --bins --quiet

mkdir -p "$OUT"
WORK="$(mktemp -d -t synopsis-demo.XXXXXX)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TRAINER_PORT="$(free_port)"; GENERATOR_PORT="$(free_port)"
export SYNOPSIS_TRAINER="http://127.0.0.1:$TRAINER_PORT"
export SYNOPSIS_GENERATOR="http://127.0.0.1:$GENERATOR_PORT"

PIDS=()
cleanup() {
  local code=$?
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== starting the trainer on $SYNOPSIS_TRAINER and the generator on $SYNOPSIS_GENERATOR (logs in $OUT/)"
"$BIN/synopsis-trainer" --listen "127.0.0.1:$TRAINER_PORT" --root "$WORK/trainer" >"$OUT/trainer.log" 2>&1 &
PIDS+=($!)
"$BIN/synopsis-generator" --listen "127.0.0.1:$GENERATOR_PORT" --trainer "$SYNOPSIS_TRAINER" \
  --cache-dir "$WORK/generator" >"$OUT/generator.log" 2>&1 &
PIDS+=($!)

for _ in $(seq 1 100); do
  "$BIN/synopsis" runs >/dev/null 2>&1 && break
  sleep 0.2
done

echo "== training the tiny preset on data/synopses.csv for $EPOCHS epochs"
"$BIN/synopsis" train --data data/synopses.csv --preset tiny --epochs "$EPOCHS" --run-name demo

RUN="$("$BIN/synopsis" runs --json | python3 -c 'import json,sys; print([json.loads(l) for l in sys.stdin][-1]["run_id"])')"
LATEST="$("$BIN/synopsis" checkpoints "$RUN" --json | python3 -c 'import json,sys; print(max((json.loads(l) for l in sys.stdin), key=lambda c: (c["step"], c["created"]))["checkpoint_id"])')"

echo "== waiting for the generator to hot-load $LATEST"
for _ in $(seq 1 150); do
  LIVE="$("$BIN/synopsis" model --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("live_checkpoint_id",""))' 2>/dev/null || true)"
  [ "$LIVE" = "$LATEST" ] && break
  sleep 0.2
done
[ "$LIVE" = "$LATEST" ] || { echo "the generator did not load $LATEST; see $OUT/generator.log" >&2; exit 1; }
"$BIN/synopsis" model

echo "== generating synopses from the original project's openings"
"$BIN/synopsis" generate --n 1 --max-new-tokens 120 --temperature 0.8 --top-k 50 --top-p 0.95 \
  --repetition-penalty 1.1 --seed 2199 --out "$OUT/generated.txt"

"$BIN/synopsis" plot "$RUN" -o "$OUT/loss.png"
echo "== done: $OUT/generated.txt, $OUT/loss.png, logs in $OUT/"
