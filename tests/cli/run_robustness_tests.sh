#!/usr/bin/env bash
# Hostile inputs through the real binary (issue 13): recipe paths that are not files, self-referencing and
# exponential YAML aliases, scalars of 50k digits, nan/inf and negative values where they make no sense,
# JSON nested 100k deep, an empty train_state.json. Each must end with one clear `error:` line naming the
# file / key / line and exit 2 (recipe, usage) or 1 (anything else): never a signal, a hang or a bare message.
#   tests/cli/run_robustness_tests.sh build/bin/automodel
set -uo pipefail
BIN=$(realpath "${1:?usage: run_robustness_tests.sh path/to/automodel}")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FIX="$ROOT/tests/fixtures/golden/llama"
T=$(mktemp -d)
export AM_CACHE_DIR="$T/am_cache"  # tokenised datasets are cached here, never in ~/.cache (docs/datasets.md)
trap 'rm -rf "$T"' EXIT
pass=0 fail=0
LIMIT=${AM_ROBUSTNESS_TIMEOUT:-60}  # seconds per command: a hang is a failure, not a stuck CI job

# expect NAME EXPECTED_CODE REGEX -- command...   (stdin: /dev/null unless redirected by the caller)
expect() {
  local name=$1 code=$2 re=$3
  shift 4
  local out rc
  out=$(timeout -k 5 "$LIMIT" "$@" 2>&1)
  rc=$?
  if [ "$rc" -eq "$code" ] && grep -Eq -- "$re" <<<"$out" &&
     ! grep -Eq 'terminate called|Segmentation|Aborted|core dumped|Sanitizer|: runtime error: |^error: (sto[a-z]+|[a-z_:]+)$' <<<"$out"; then
    pass=$((pass + 1))
    echo "ok   $name (exit $rc): $(grep -E -- "$re" <<<"$out" | head -1 | cut -c1-220)"
  else
    fail=$((fail + 1))
    [ "$rc" -eq 124 ] && echo "FAIL $name: timed out after ${LIMIT}s (a hang)" || echo "FAIL $name: exit $rc (want $code), output:"
    grep -E -m1 -A20 'ERROR: [A-Za-z]+Sanitizer|: runtime error: ' <<<"$out" | sed 's/^/     /'  # a sanitizer report
    sed 's/^/     /' <<<"$out" | tail -5 | cut -c1-300
  fi
}

cp -r "$FIX" "$T/case"
R="$T/case/recipe.yaml"
CK="--checkpoint.checkpoint_dir=$T/ck"

# ---- recipe files that are not recipes ----
expect "/dev/zero recipe" 2 "recipe /dev/zero is not a regular file \(a character device\)" -- "$BIN" finetune /dev/zero
expect "directory recipe" 2 "recipe $T is a directory" -- "$BIN" finetune "$T"
mkfifo "$T/fifo.yaml"
expect "fifo recipe" 2 "fifo.yaml is not a regular file \(a pipe" -- "$BIN" finetune "$T/fifo.yaml"
{ cat "$R"; head -c $((5 * 1024 * 1024)) /dev/zero | tr '\0' '#'; } > "$T/huge.yaml"
expect "recipe over 4 MiB" 2 "huge.yaml is [0-9]+ bytes; a recipe may be at most 4 MiB" -- "$BIN" finetune "$T/huge.yaml"

# ---- YAML aliases ----
printf 'a: &a [*a]\n' > "$T/case/cyclic.yaml"
expect "cyclic alias in the file" 2 "cyclic.yaml:1: key 'a.0': cyclic YAML alias" -- "$BIN" finetune "$T/case/cyclic.yaml"
expect "cyclic alias override" 2 "command-line override --a.b.*cyclic YAML alias" -- "$BIN" finetune "$R" $CK '--a.b=&x [*x]'
python3 - "$T/case/bomb.yaml" <<'PY'
import sys
lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
for i in range(1, 9):
    lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i-1}"] * 10) + "]")
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY
expect "alias bomb (billion laughs)" 2 "bomb.yaml:[0-9]+: key 'l[0-9.]+': the YAML expands to more than [0-9]+ values" -- "$BIN" finetune "$T/case/bomb.yaml"

# ---- scalars ----
{ echo "seed: $(head -c 50000 /dev/zero | tr '\0' '7')"; grep -v '^seed:' "$R"; } > "$T/case/digits.yaml"
expect "50k-digit scalar" 2 "digits.yaml:1: key 'seed': 7{32}\.\.\. \(50000 characters\) is out of range for an integer" -- "$BIN" finetune "$T/case/digits.yaml" $CK
expect "50k-digit override" 2 "command-line override --seed: 7{32}\.\.\. \(50000 characters\) is out of range" -- "$BIN" finetune "$R" $CK "--seed=$(head -c 50000 /dev/zero | tr '\0' '7')"
expect "20-digit seed" 2 "override --seed: 123456789012345678901 is out of range for an integer" -- "$BIN" finetune "$R" $CK --seed=123456789012345678901
expect "float overflow" 2 "override --optimizer.lr: 1e999 is out of range for a number" -- "$BIN" finetune "$R" $CK --optimizer.lr=1e999
python3 -c 'print("a: " + "[" * 100000 + "]" * 100000)' > "$T/deep.yaml"
expect "deep YAML" 2 "deep.yaml:1:[0-9]+: YAML nested too deeply" -- "$BIN" finetune "$T/deep.yaml"

# ---- values that make no sense ----
expect "lr .inf" 2 "override --optimizer.lr: must be a finite number, got .inf" -- "$BIN" finetune "$R" $CK --optimizer.lr=.inf
expect "lr .nan" 2 "override --optimizer.lr: must be a finite number, got .nan" -- "$BIN" finetune "$R" $CK --optimizer.lr=.nan
sed 's/^  lr: 1.0e-3/  lr: .inf/' "$R" > "$T/case/inf.yaml"
expect "lr .inf in the file" 2 "inf.yaml:[0-9]+: key 'optimizer.lr': must be a finite number, got .inf" -- "$BIN" finetune "$T/case/inf.yaml" $CK
expect "eps -1" 2 "override --optimizer.eps: must be > 0, got -1" -- "$BIN" finetune "$R" $CK --optimizer.eps=-1
expect "weight_decay -.inf" 2 "override --optimizer.weight_decay: must be a finite number" -- "$BIN" finetune "$R" $CK --optimizer.weight_decay=-.inf
expect "betas nan" 2 "optimizer.betas.*each beta must be in \[0, 1\)" -- "$BIN" finetune "$R" $CK '--optimizer.betas=[.nan, 0.9]'
expect "num_epochs -1" 2 "override --step_scheduler.num_epochs: must be >= 0, got -1" -- "$BIN" finetune "$R" $CK --step_scheduler.num_epochs=-1
expect "warmup -1" 2 "override --lr_scheduler.lr_warmup_steps: must be >= 0" -- "$BIN" finetune "$R" $CK --lr_scheduler.lr_warmup_steps=-1
expect "packed_sequence_size -1" 2 "override --packed_sequence.packed_sequence_size: must be >= 0" -- "$BIN" finetune "$R" $CK --packed_sequence.packed_sequence_size=-1
expect "max_norm .nan" 2 "override --clip_grad_norm.max_norm: must be > 0" -- "$BIN" finetune "$R" $CK --clip_grad_norm.max_norm=.nan

# ---- JSON nested 100k deep ----
DEEP=$(python3 -c 'print("[" * 100000 + "]" * 100000)')
mkdir -p "$T/deepcfg" && cp "$T/case/model/model.safetensors" "$T/deepcfg/"
printf '{"model_type": "llama", "rope_scaling": %s}\n' "$DEEP" > "$T/deepcfg/config.json"
expect "deep config.json" 1 "deepcfg/config.json: not valid JSON: JSON nested deeper than [0-9]+ levels" -- "$BIN" finetune "$R" $CK --model.pretrained_model_name_or_path=$T/deepcfg
{ head -1 "$T/case/data.jsonl"; printf '{"input_ids": %s}\n' "$DEEP"; } > "$T/case/deep.jsonl"
expect "deep JSONL line" 1 "deep.jsonl:2: malformed JSON line: JSON nested deeper" -- "$BIN" finetune "$R" $CK --dataset.path_or_dataset=$T/case/deep.jsonl
# a tokenizer folder: byte-level BPE without merges and a ChatML template
python3 - "$T/tok" <<'PY'
import json, os, sys
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
vis = [b for b in range(256) if 33 <= b <= 126 or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
vocab, n = {}, 0
for b in range(256):
    c = b if b in vis else 256 + n
    if b not in vis: n += 1
    vocab[chr(c)] = b
vocab["<|im_end|>"] = 256
json.dump({"version": "1.0", "added_tokens": [{"id": 256, "content": "<|im_end|>", "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": False, "special": True}], "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "vocab": vocab, "merges": []}}, open(os.path.join(d, "tokenizer.json"), "w"))
json.dump({"eos_token": "<|im_end|>", "chat_template": "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"},
          open(os.path.join(d, "tokenizer_config.json"), "w"))
PY
printf '"hello"\n%s\n' "$DEEP" > "$T/deep_lines.jsonl"
expect "tokenize: deep line" 1 "deep_lines.jsonl:2: invalid JSON: JSON nested deeper" -- "$BIN" tokenize --tokenizer "$T/tok" --jsonl "$T/deep_lines.jsonl"
printf '[{"role": "user", "content": "hi"}]\n%s\n' "$DEEP" > "$T/deep_chat.jsonl"
expect "chat-template: deep line" 1 "deep_chat.jsonl:2: invalid JSON: JSON nested deeper" -- "$BIN" chat-template --tokenizer "$T/tok" --jsonl "$T/deep_chat.jsonl"
mkdir -p "$T/deeptok" && cp "$T/tok/tokenizer_config.json" "$T/deeptok/"
printf '{"model": %s}\n' "$DEEP" > "$T/deeptok/tokenizer.json"
expect "deep tokenizer.json" 1 "deeptok/tokenizer.json: invalid JSON: JSON nested deeper" -- "$BIN" tokenize --tokenizer "$T/deeptok" --jsonl "$T/deep_lines.jsonl"

# ---- an empty or truncated train_state.json on restore ----
mkdir -p "$T/badck"
: > "$T/badck/train_state.json"
expect "empty train_state.json" 1 "badck/train_state.json: empty file" -- "$BIN" finetune "$R" $CK --checkpoint.restore_from=$T/badck
printf '{"step": 3, "ep' > "$T/badck/train_state.json"
expect "truncated train_state.json" 1 "badck/train_state.json: not valid JSON" -- "$BIN" finetune "$R" $CK --checkpoint.restore_from=$T/badck
printf '{}' > "$T/badck/train_state.json"
expect "train_state.json without step" 1 "badck/train_state.json: missing 'step'" -- "$BIN" finetune "$R" $CK --checkpoint.restore_from=$T/badck
printf '{"step": "three", "epoch": 0}' > "$T/badck/train_state.json"
expect "train_state.json step not a number" 1 "badck/train_state.json: 'step' must be an integer" -- "$BIN" finetune "$R" $CK --checkpoint.restore_from=$T/badck

echo "robustness tests: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
