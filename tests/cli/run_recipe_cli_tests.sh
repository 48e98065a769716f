#!/usr/bin/env bash
# AutoModel recipes as written (issue 11), through the real binary on the tiny golden llama: AutoModel's
# keys accepted with one warning line per setting we do not have, typos listed at once with suggestions,
# AutoModel's spellings (recipe:, rng.seed, none, bare --flags, dataloader.batch_size, benchmark:) honoured,
# subcommand --help, keep_last_n.
#   tests/cli/run_recipe_cli_tests.sh build/bin/automodel
set -uo pipefail
BIN=$(realpath "${1:?usage: run_recipe_cli_tests.sh path/to/automodel}")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
T=$(mktemp -d)
export AM_CACHE_DIR="$T/am_cache"  # tokenised datasets are cached here, never in ~/.cache (docs/datasets.md)
trap 'rm -rf "$T"' EXIT
pass=0 fail=0

# expect NAME EXPECTED_CODE REGEX -- command...
expect() {
  local name=$1 code=$2 re=$3
  shift 4
  local out rc
  out=$("$@" 2>&1)
  rc=$?
  if [ "$rc" -eq "$code" ] && grep -Eq -- "$re" <<<"$out" && ! grep -Eq 'terminate called|Segmentation|Aborted|core dumped|Sanitizer|: runtime error: ' <<<"$out"; then
    pass=$((pass + 1))
    echo "ok   $name (exit $rc): $(grep -E -- "$re" <<<"$out" | head -1)"
  else
    fail=$((fail + 1))
    echo "FAIL $name: exit $rc (want $code, /$re/), output:"
    grep -E -m1 -A20 'ERROR: [A-Za-z]+Sanitizer|: runtime error: ' <<<"$out" | sed 's/^/     /'  # a sanitizer report
    sed 's/^/     /' <<<"$out" | tail -8
  fi
}
check() {  # NAME CONDITION...
  local name=$1
  shift
  if "$@"; then pass=$((pass + 1)); echo "ok   $name"; else fail=$((fail + 1)); echo "FAIL $name"; fi
}

cp -r "$ROOT/tests/fixtures/golden/llama" "$T/case"
R="$T/case/recipe.yaml"

# ---- an AutoModel-style recipe: every section as AutoModel writes it ----
cat > "$T/case/am.yaml" <<'EOF'
recipe: TrainFinetuneRecipeForNextTokenPrediction
step_scheduler:
  global_batch_size: 4
  local_batch_size: 2
  ckpt_every_steps: 1000
  val_every_steps: 2
  num_epochs: 1
  max_steps: 2
  gc_every_steps: 10
dist_env:
  backend: nccl
  timeout_minutes: 1
rng:
  _target_: nemo_automodel.components.training.rng.StatefulRNG
  seed: 1111
  ranked: true
model:
  _target_: nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained
  pretrained_model_name_or_path: model
  backend:
    _target_: nemo_automodel.components.models.common.BackendConfig
    attn: te
    rms_norm: torch_fp32
compile:
  enabled: false
  mode: default
clip_grad_norm:
  max_norm: 1.0
distributed:
  strategy: fsdp2
  dp_size: none
  tp_size: 2
  cp_size: 1
  sequence_parallel: false
loss_fn:
  _target_: nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy
  fp32_upcast: true
dataset:
  _target_: tokenized_jsonl
  path_or_dataset: data.jsonl
packed_sequence:
  packed_sequence_size: 0
dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  collate_fn:
    _target_: nemo_automodel.components.datasets.utils.default_collater
    pad_seq_len_divisible: 16
  shuffle: false
  num_workers: 2
validation_dataset:
  _target_: tokenized_jsonl
  path_or_dataset: data.jsonl
validation_dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  batch_size: 4
optimizer:
  _target_: torch.optim.Adam
  betas: [0.9, 0.999]
  eps: 1e-8
  lr: 1.0e-5
  weight_decay: 0
lr_scheduler:
  lr_decay_style: cosine
  min_lr: 1.0e-6
wandb:
  project: p
  name: n
ci:
  recipe_owner: someone
EOF
expect "automodel recipe trains" 0 "^step 2 " -- "$BIN" finetune "$T/case/am.yaml" --checkpoint.checkpoint_dir="$T/ck_am"
out=$("$BIN" finetune "$T/case/am.yaml" --checkpoint.checkpoint_dir="$T/ck_am2" 2>&1)
check "tp_size warned with what runs instead" grep -q "key 'distributed.tp_size' (2): tensor parallelism is not supported; the GPUs run data parallel" <<<"$out"
check "backend choice warned" grep -q "key 'model.backend.attn' (te)" <<<"$out"
check "wandb warned once" test "$(grep -c wandb <<<"$out")" -eq 1
check "inert knobs are quiet" bash -c "! grep -Eq 'num_workers|gc_every_steps|dist_env|ci\.|rms_norm|fp32_upcast|compile' <<<'$out'"
check "validation ran with its own batch size" grep -q '"val_loss"' "$T/ck_am2/validation.jsonl"

# ---- typos: all at once, in file order, with suggestions; exit 2 ----
sed -e 's/^  weight_decay: 0.1/  wieght_decay: 0.1/' -e 's/^  max_steps: 4/  max_step: 4/' "$R" > "$T/case/typos.yaml"
expect "typos listed at once" 2 "2 problems with the recipe's keys" -- "$BIN" finetune "$T/case/typos.yaml"
expect "typo suggestion" 2 "key 'step_scheduler.max_step': unknown recipe key; did you mean 'step_scheduler.max_steps'\\?" -- "$BIN" finetune "$T/case/typos.yaml"
expect "typo in an override section" 2 "command-line override --optimzer.lr .*did you mean 'optimizer'" -- "$BIN" finetune "$R" --optimzer.lr=1

# ---- recipe classes ----
expect "KD recipe refused" 2 "knowledge distillation is not supported" -- "$BIN" finetune "$R" --recipe=KnowledgeDistillationRecipeForNextTokenPrediction
expect "benchmark recipe via automodel R.yaml is timed" 0 '"timed_steps": 2' -- \
  "$BIN" "$R" --recipe=BenchmarkingRecipeForNextTokenPrediction --benchmark.warmup_steps=1 --step_scheduler.max_steps=3 \
  --benchmark.json_output_path="$T/bench.json" --checkpoint.enabled=false
check "benchmark.json_output_path written" grep -q '"tokens_per_s"' "$T/bench.json"
expect "benchmark recipe via finetune trains" 0 "automodel bench. \\(or .automodel RECIPE.yaml.\\) times it" -- \
  "$BIN" finetune "$R" --recipe=BenchmarkingRecipeForNextTokenPrediction --checkpoint.checkpoint_dir="$T/ck_bf"

# ---- spellings ----
expect "none is null" 0 "^step 4 " -- "$BIN" finetune "$R" --validation_dataset=none --checkpoint.checkpoint_dir="$T/ck_none"
expect "bare --flag means true" 0 "^step 4 " -- "$BIN" finetune "$R" --distributed.activation_checkpointing --checkpoint.checkpoint_dir="$T/ck_flag"
expect "--help finetune" 0 "usage: automodel finetune RECIPE.yaml" -- "$BIN" finetune --help
expect "--help bench" 0 "usage: automodel bench RECIPE.yaml" -- "$BIN" bench --help
expect "--help eval" 0 "usage: automodel eval RECIPE.yaml" -- "$BIN" eval -h
expect "--model.tokenizer is read" 1 "model.tokenizer: $T/no_tokenizer: no such folder" -- "$BIN" finetune "$R" --model.tokenizer="$T/no_tokenizer"
expect "dataloader.batch_size differs: AutoModel's step" 0 "a step takes 2 of them \\(2 samples\\)" -- \
  "$BIN" finetune "$R" --dataloader.batch_size=1 --checkpoint.checkpoint_dir="$T/ck_dlbs"
check "dataloader.batch_size: max_steps 4 of 2 samples" test "$(wc -l < "$T/ck_dlbs/training.jsonl")" -eq 4

# rng.seed seeds the random init (from_config); the top-level seed does not change it (no shuffling here).
FC=(--model._target_=nemo_automodel.NeMoAutoModelForCausalLM.from_config --step_scheduler.max_steps=1 --checkpoint.enabled=false)
l1=$("$BIN" finetune "$R" "${FC[@]}" --rng.seed=1 --seed=5 2>&1 | grep '^step 1 ' | sed 's/ | tps.*//')
l2=$("$BIN" finetune "$R" "${FC[@]}" --rng.seed=1 --seed=6 2>&1 | grep '^step 1 ' | sed 's/ | tps.*//')
l3=$("$BIN" finetune "$R" "${FC[@]}" --rng.seed=2 --seed=5 2>&1 | grep '^step 1 ' | sed 's/ | tps.*//')
check "rng.seed decides the init" test -n "$l1" -a "$l1" = "$l2" -a "$l1" != "$l3"

# keep_last_n / max_recent_checkpoints
"$BIN" finetune "$R" --step_scheduler.ckpt_every_steps=1 --checkpoint.max_recent_checkpoints=2 \
  --checkpoint.checkpoint_dir="$T/ck_keep" > "$T/keep.log" 2>&1
check "max_recent_checkpoints keeps the newest 2" test "$(ls -d "$T"/ck_keep/epoch_* | wc -l)" -eq 2 -a -d "$T/ck_keep/epoch_0_step_4"

echo "recipe CLI: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
