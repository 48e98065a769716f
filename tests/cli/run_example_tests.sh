#!/usr/bin/env bash
# Runs every recipe in examples/ (our versions of AutoModel's common recipes) through the real binary on tiny
# models, overriding only what a user without the big models and hub datasets would: the model path, the
# data files, the step count and the batch sizes (and ep_size for the MoE recipe, whose ep_size 8 needs 8 ranks).
#   tests/cli/run_example_tests.sh build/bin/automodel
# The tiny models use real tokenizers (tools/fetch_tokenizers.sh); without them the script skips.
set -uo pipefail
BIN=$(realpath "${1:?usage: run_example_tests.sh path/to/automodel}")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TOKS="${AM_TOKENIZER_CACHE:-$ROOT/.cache/tokenizers}"
DATA="$ROOT/tests/fixtures/data"
EX="$ROOT/examples"
T=$(mktemp -d)
export AM_CACHE_DIR="$T/am_cache"  # tokenised datasets are cached here, never in ~/.cache (docs/datasets.md)
trap 'rm -rf "$T"' EXIT
pass=0 fail=0

for tok in llama3_1 qwen3; do
  if [ ! -f "$TOKS/$tok/tokenizer.json" ]; then
    echo "run_example_tests: skipped: $TOKS/$tok missing (run tools/fetch_tokenizers.sh)"
    exit 0
  fi
done

ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() {
  fail=$((fail + 1))
  echo "FAIL $1"
  [ -n "${2:-}" ] && grep -E -m1 -A20 'ERROR: [A-Za-z]+Sanitizer|: runtime error: ' "$2" | sed 's/^/     /'  # a sanitizer report
  [ -n "${2:-}" ] && sed 's/^/     /' "$2" | tail -8
}

# A tiny pretrained HF folder for a family: random init from a small config.json with a real tokenizer's
# vocabulary, trained one step and exported (config, safetensors, tokenizer files), as a user's folder would be.
make_tiny() {  # NAME TOKENIZER CONFIG_JSON
  local name=$1 tok=$2 cfg=$3
  mkdir -p "$T/$name.src"
  printf '%s\n' "$cfg" > "$T/$name.src/config.json"
  cat > "$T/$name.src/make.yaml" <<EOF
seed: 3
device: cpu
model: {config: config.json, tokenizer: $TOKS/$tok}
step_scheduler: {global_batch_size: 2, local_batch_size: 2, max_steps: 1}
dataset: {_target_: mock, seq_len: 16, num_samples: 2}
optimizer: {lr: 1.0e-3}
checkpoint: {checkpoint_dir: $T/$name.ck, save_consolidated: final}
EOF
  if "$BIN" finetune "$T/$name.src/make.yaml" > "$T/$name.make.log" 2>&1 &&
     [ -f "$T/$name.ck/LATEST/model/consolidated/tokenizer.json" ]; then
    ln -s "$T/$name.ck/LATEST/model/consolidated" "$T/$name"
  else
    bad "make tiny $name" "$T/$name.make.log"
  fi
}

make_tiny tiny_llama llama3_1 '{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
  "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
  "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": true,
  "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "float32"}'
make_tiny tiny_qwen3_moe qwen3 '{"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936,
  "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2,
  "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 2048,
  "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": false, "output_router_logits": false,
  "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"}'

# A small HellaSwag file in the 6-lines-per-task text layout (from ../shared when present, else skipped).
HS="$ROOT/../shared/datasets/hellaswag/hellaswag_val_full.txt.bz2"
[ -f "$HS" ] && bzcat "$HS" | head -n 120 > "$T/hellaswag_small.txt"

# run NAME RECIPE EXPECTED_EXIT REGEX -- overrides...
run() {
  local name=$1 recipe=$2 code=$3 re=$4
  shift 5
  local log="$T/$name.log"
  "$BIN" finetune "$recipe" --checkpoint.checkpoint_dir="$T/ck_$name" --step_scheduler.max_steps=2 \
    --step_scheduler.global_batch_size=4 --step_scheduler.local_batch_size=2 "$@" > "$log" 2>&1
  local rc=$?
  if [ "$rc" -ne "$code" ] || ! grep -Eq -- "$re" "$log" || grep -Eq 'terminate called|Segmentation|Aborted|core dumped|Sanitizer|: runtime error: ' "$log"; then
    bad "$name (exit $rc, want $code; /$re/)" "$log"
    return
  fi
  if [ "$code" -eq 0 ] && [ "$(wc -l < "$T/ck_$name/training.jsonl")" -ne 2 ]; then
    bad "$name: training.jsonl should have 2 steps" "$log"
    return
  fi
  ok "$name: $(grep -E -- "$re" "$log" | tail -1)"
}

SQ="$DATA/squad_dev_subset.json"
if [ -e "$T/tiny_llama" ]; then
  run llama_squad "$EX/llama3_2/llama3_2_1b_squad.yaml" 0 "^step 2 " -- \
    --model.pretrained_model_name_or_path="$T/tiny_llama" --dataset.dataset_name="$SQ" --validation_dataset.dataset_name="$SQ" \
    --step_scheduler.val_every_steps=2
  [ -f "$T/ck_llama_squad/LATEST/model/consolidated/model.safetensors" ] && ok "llama_squad: consolidated HF folder" ||
    bad "llama_squad: no consolidated model"
  grep -q '"val_loss"' "$T/ck_llama_squad/validation.jsonl" 2>/dev/null && ok "llama_squad: validation ran" || bad "llama_squad: no validation.jsonl"
  if [ -f "$T/hellaswag_small.txt" ]; then
    run llama_hellaswag "$EX/llama3_2/llama3_2_1b_hellaswag.yaml" 0 "^step 2 " -- \
      --model.pretrained_model_name_or_path="$T/tiny_llama" --dataset.path_or_dataset="$T/hellaswag_small.txt" \
      --validation_dataset.path_or_dataset="$T/hellaswag_small.txt"
  else
    echo "skip llama_hellaswag: ../shared/datasets/hellaswag missing"
  fi
  run llama_chat "$EX/llama3_2/llama3_2_1b_chat.yaml" 0 "^step 2 " -- \
    --model.pretrained_model_name_or_path="$T/tiny_llama" --dataset.path_or_dataset_id="$DATA/chat_small.jsonl"
  run llama_squad_peft "$EX/llama3_2/llama3_2_1b_squad_peft.yaml" 0 "^step 2 " -- \
    --model.pretrained_model_name_or_path="$T/tiny_llama" --dataset.dataset_name="$SQ" --validation_dataset.dataset_name="$SQ"
  [ -f "$T/ck_llama_squad_peft/LATEST/model/adapter_config.json" ] && [ -f "$T/ck_llama_squad_peft/LATEST/model/adapter_model.safetensors" ] &&
    ok "llama_squad_peft: PEFT adapter folder" || bad "llama_squad_peft: no adapter in model/" "$T/llama_squad_peft.log"
  grep -q "lm_head is not adapted" "$T/llama_squad_peft.log" && ok "llama_squad_peft: match_all_linear leaves lm_head out, said once" ||
    bad "llama_squad_peft: no lm_head warning" "$T/llama_squad_peft.log"
fi
if [ -e "$T/tiny_qwen3_moe" ]; then
  run qwen3_moe_squad "$EX/qwen3/qwen3_moe_30b_squad.yaml" 0 "^step 2 " -- \
    --model.pretrained_model_name_or_path="$T/tiny_qwen3_moe" --dataset.dataset_name="$SQ" --validation_dataset.dataset_name="$SQ" \
    --distributed.ep_size=1
  grep -q "key 'model.backend.dispatcher' (deepep)" "$T/qwen3_moe_squad.log" && ok "qwen3_moe_squad: backend choices warned" ||
    bad "qwen3_moe_squad: no dispatcher warning" "$T/qwen3_moe_squad.log"
fi

echo "examples: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
