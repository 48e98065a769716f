#!/usr/bin/env bash
# make demo: fine-tunes the embedded default (examples/demo/demo.yaml) on the CPU and shows where the HF
# checkpoint went.   examples/demo/run_demo.sh path/to/automodel
set -euo pipefail
BIN=$(realpath "${1:-build/bin/automodel}")
shift || true
cd "$(dirname "$0")"
OUT=${DEMO_OUT:-$(pwd)/../../demo_out}
rm -rf "$OUT"
echo "== automodel demo: Llama-architecture model (random init, $(grep -c . gsm8k_train_512.tokenized.jsonl) GSM8K problems), CPU =="
start=$(date +%s)
"$BIN" finetune demo.yaml --checkpoint.checkpoint_dir="$OUT" "$@"
end=$(date +%s)
latest=$(cat "$OUT/LATEST")
echo
echo "== done in $((end - start)) s: loss $(head -1 "$OUT/training.jsonl" | sed -E 's/.*"loss":([0-9.]+).*/\1/') -> $(tail -1 "$OUT/training.jsonl" | sed -E 's/.*"loss":([0-9.]+).*/\1/')"
echo "== HF checkpoint: $OUT/$latest/model/consolidated"
ls -la "$OUT/$latest/model/consolidated"
