#!/usr/bin/env bash
# CLI-level tests through the real binary: bad inputs give one clear message naming the key / file / line /
# value, exit code 2 (usage, recipe) or 1 (anything else), and never a crash; plus an end-to-end run.
#   tests/cli/run_cli_tests.sh build/bin/automodel
set -uo pipefail
BIN=$(realpath "${1:?usage: run_cli_tests.sh path/to/automodel}")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FIX="$ROOT/tests/fixtures/golden/llama"
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
    echo "FAIL $name: exit $rc (want $code), output:"
    grep -E -m1 -A20 'ERROR: [A-Za-z]+Sanitizer|: runtime error: ' <<<"$out" | sed 's/^/     /'  # a sanitizer report
    sed 's/^/     /' <<<"$out" | tail -5
  fi
}

cp -r "$FIX" "$T/case"
R="$T/case/recipe.yaml"
CK="--checkpoint.checkpoint_dir=$T/ck"

expect "no arguments" 2 "usage" -- "$BIN"
expect "unknown command" 2 "unknown command 'frobnicate'" -- "$BIN" frobnicate
expect "recipe file missing" 2 "recipe file not found: $T/nope.yaml" -- "$BIN" finetune "$T/nope.yaml"

# unknown recipe key: names the file, line and key
sed 's/^  weight_decay: 0.1/  weight_decay: 0.1\n  wieght_decay: 0.2/' "$R" > "$T/unknown_key.yaml"
cp "$T/unknown_key.yaml" "$T/case/unknown_key.yaml"
expect "unknown recipe key" 2 "unknown_key.yaml:[0-9]+: key 'optimizer.wieght_decay': unknown recipe key" -- "$BIN" finetune "$T/case/unknown_key.yaml" $CK
expect "unknown override key" 2 "override --optimizer.lrr: unknown recipe key" -- "$BIN" finetune "$R" $CK --optimizer.lrr=1
# YAML syntax error: file:line:col
printf 'seed: 1\nmodel:\n  pretrained_model_name_or_path: [model\n' > "$T/case/syntax.yaml"
expect "yaml syntax error" 2 "syntax.yaml:[0-9]+:[0-9]+: YAML syntax error" -- "$BIN" finetune "$T/case/syntax.yaml"
# value of the wrong type
sed 's/^  lr: 1.0e-3/  lr: fast/' "$R" > "$T/case/badtype.yaml"
expect "wrong value type" 2 "badtype.yaml:[0-9]+: key 'optimizer.lr': expected a number, got a string \"fast\"" -- "$BIN" finetune "$T/case/badtype.yaml" $CK
expect "wrong override type" 2 "override --step_scheduler.global_batch_size: expected an integer" -- "$BIN" finetune "$R" $CK --step_scheduler.global_batch_size=four
expect "bad batch sizes" 2 "global_batch_size'?: must be a multiple of local_batch_size" -- "$BIN" finetune "$R" $CK --step_scheduler.local_batch_size=3
# missing model folder
expect "missing model folder" 1 "pretrained_model_name_or_path.*$T/nowhere" -- "$BIN" finetune "$R" $CK --model.pretrained_model_name_or_path=$T/nowhere
# truncated safetensors
mkdir -p "$T/trunc" && cp "$T/case/model/config.json" "$T/trunc/" && head -c 5000 "$T/case/model/model.safetensors" > "$T/trunc/model.safetensors"
expect "truncated safetensors" 1 "trunc/model.safetensors.*(truncated|shorter|beyond|out of range|exceeds)" -- "$BIN" finetune "$R" $CK --model.pretrained_model_name_or_path=$T/trunc
# malformed JSONL line (line 3)
awk 'NR==3{print "{\"input_ids\": [1, 2,"; next} {print}' "$T/case/data.jsonl" > "$T/case/bad.jsonl"
expect "malformed jsonl line" 1 "bad.jsonl:3: malformed JSON line" -- "$BIN" finetune "$R" $CK --dataset.path_or_dataset=$T/case/bad.jsonl
# token id out of range (vocab 300)
awk 'NR==2{print "{\"input_ids\": [1, 5, 300000, 7]}"; next} {print}' "$T/case/data.jsonl" > "$T/case/oor.jsonl"
expect "token id out of range" 1 "oor.jsonl:2: token id 300000 at input_ids\[2\] is out of range for vocab_size 300" -- "$BIN" finetune "$R" $CK --dataset.path_or_dataset=$T/case/oor.jsonl
# unsupported model type
sed 's/"model_type": "llama"/"model_type": "gpt_neox"/' "$T/case/model/config.json" > "$T/gptneox.json"
mkdir -p "$T/neox" && cp "$T/gptneox.json" "$T/neox/config.json" && cp "$T/case/model/model.safetensors" "$T/neox/"
expect "unsupported model_type" 1 "model_type 'gpt_neox' is not supported" -- "$BIN" finetune "$R" $CK --model.pretrained_model_name_or_path=$T/neox
# restore from a checkpoint dir that does not exist
expect "restore_from missing" 1 "restore_from: LATEST: no .*LATEST" -- "$BIN" finetune "$R" --checkpoint.checkpoint_dir=$T/empty_ck --checkpoint.restore_from=LATEST
# a hub dataset id that is not in the local HF caches: exit 1, naming the id, where it looked and how to get it
expect "dataset not cached" 1 "dataset 'nobody/nothing' is not a local file.*$T/nohub/datasets--nobody--nothing.*hf download --repo-type dataset nobody/nothing" -- \
  env HF_HUB_CACHE=$T/nohub HF_DATASETS_CACHE=$T/nods "$BIN" finetune "$R" $CK --dataset._target_=squad --dataset.path_or_dataset=nobody/nothing --dataset.tokenizer=$ROOT/tests/fixtures/generate/tokenizer
expect "bad dataset split" 2 "dataset.split.*unrecognized split 'train\[5\]'" -- \
  "$BIN" finetune "$R" $CK --dataset._target_=squad --dataset.path_or_dataset=nobody/nothing --dataset.split='train[5]' --dataset.tokenizer=$ROOT/tests/fixtures/generate/tokenizer

# end to end: the alias forms, training.jsonl and the consolidated export
expect "finetune runs" 0 "step 4 \| epoch 0 \| loss" -- "$BIN" finetune "$R" $CK
expect "alias RECIPE.yaml" 0 "step 4 \| epoch 0" -- "$BIN" "$R" --checkpoint.checkpoint_dir=$T/ck2
expect "alias finetune llm -c" 0 "step 4 \| epoch 0" -- "$BIN" finetune llm -c "$R" --checkpoint.checkpoint_dir=$T/ck3
expect "consolidated export" 0 "model.safetensors" -- ls "$T/ck/epoch_0_step_4/model/consolidated"
expect "info" 0 "features: cpu" -- "$BIN" info

# MoE through the CLI (mixtral golden: hub per-expert names block_sparse_moe.experts.{e}.w1/w2/w3, aux loss on)
MX="$ROOT/tests/fixtures/golden/mixtral"
cp -r "$MX" "$T/mx"
expect "moe finetune" 0 "step 4 \| epoch 0 \| loss 5\.74" -- "$BIN" finetune "$T/mx/recipe.yaml" --checkpoint.checkpoint_dir=$T/mxck
expect "moe metrics in training.jsonl" 0 "moe_expert_cv.*router_aux_loss" -- grep -m1 moe_expert_cv "$T/mxck/training.jsonl"
expect "moe export keeps per-expert names" 0 "block_sparse_moe\.experts\.3\.w2\.weight" -- grep -ao "block_sparse_moe.experts.3.w2.weight" "$T/mxck/epoch_0_step_4/model/consolidated/model.safetensors"
# a missing expert tensor is named
python3 - "$T/mx/model/model.safetensors" "$T/mx_missing" <<'PY' 2>/dev/null || true
import json, os, struct, sys
src, out = sys.argv[1], sys.argv[2]
b = open(src, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); data = b[8 + n:]
drop = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
keep = {k: v for k, v in h.items() if k != drop and k != "__metadata__"}
off, parts, hdr = 0, [], {}
for k, v in keep.items():
    s, e = v["data_offsets"]; parts.append(data[s:e]); hdr[k] = dict(v, data_offsets=[off, off + e - s]); off += e - s
hb = json.dumps(hdr).encode(); hb += b" " * ((8 - len(hb) % 8) % 8)
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "model.safetensors"), "wb").write(struct.pack("<Q", len(hb)) + hb + b"".join(parts))
PY
if [ -f "$T/mx_missing/model.safetensors" ]; then
  cp "$T/mx/model/config.json" "$T/mx_missing/"
  expect "moe missing expert tensor" 1 "model.layers.1.block_sparse_moe.experts.2.w3.weight.* missing" -- "$BIN" finetune "$T/mx/recipe.yaml" --checkpoint.checkpoint_dir=$T/mxck2 --model.pretrained_model_name_or_path=$T/mx_missing
fi

# preemption (SPEC §4): SIGUSR1 (Slurm's warning) makes the run finish its step, checkpoint and exit 0; a later
# run with restore_from: LATEST continues at the next step
PK="$T/preempt"
"$BIN" finetune "$R" --checkpoint.checkpoint_dir="$PK" --step_scheduler.num_epochs=100000 --step_scheduler.max_steps=400000 \
  --checkpoint.save_consolidated=false > "$T/preempt.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do [ -s "$PK/training.jsonl" ] && break; sleep 0.1; done
sleep 0.5
kill -USR1 "$PID"
rc=0
for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$PID" 2>/dev/null; then kill -9 "$PID"; rc=99; else wait "$PID" || rc=$?; fi
last=$(tail -1 "$PK/training.jsonl" | sed -E 's/.*"step":([0-9]+).*/\1/')
if [ "$rc" -eq 0 ] && [ -L "$PK/LATEST" ] && [ "$(basename "$(readlink "$PK/LATEST")")" = "epoch_$(( (last - 1) / 4 ))_step_$last" ]; then
  pass=$((pass + 1)); echo "ok   SIGUSR1 saves and exits 0 (step $last, LATEST -> $(readlink "$PK/LATEST"))"
else
  fail=$((fail + 1)); echo "FAIL SIGUSR1: exit $rc, last step $last, LATEST -> $(readlink "$PK/LATEST" 2>/dev/null)"; tail -3 "$T/preempt.log"
fi
expect "resume after preemption" 0 "step $((last + 1)) \| epoch" -- "$BIN" finetune "$R" --checkpoint.checkpoint_dir="$PK" \
  --step_scheduler.num_epochs=100000 --step_scheduler.max_steps=$((last + 1)) --checkpoint.restore_from=LATEST

# ---- automodel generate (docs/generate.md): the llama golden model + the tiny tokenizer of tests/fixtures/generate ----
GM="$T/genmodel"
mkdir -p "$GM" && cp "$FIX"/model/{config.json,generation_config.json,model.safetensors} "$ROOT"/tests/fixtures/generate/tokenizer/* "$GM/"
G=("$BIN" generate --model "$GM" --device cpu)
expect "generate --help" 0 "usage: automodel generate" -- "$BIN" generate --help
expect "generate unknown flag" 2 "unknown argument '--frobnicate'" -- "${G[@]}" --prompt "the cat" --frobnicate
expect "generate prompt and chat" 2 "--prompt or --chat, not both" -- "${G[@]}" --prompt a --chat b
expect "generate no prompt" 2 "--prompt TEXT or --chat TEXT is required" -- "${G[@]}"
expect "generate bad number" 2 "--max-new-tokens: expected an integer >= 1, got 'many'" -- "${G[@]}" --prompt a --max-new-tokens many
expect "generate missing model" 1 "$T/no_model" -- "$BIN" generate --model "$T/no_model" --prompt a --device cpu
expect "generate missing adapter" 1 "$T/no_adapter" -- "${G[@]}" --prompt a --adapter "$T/no_adapter"
expect "generate greedy" 0 "prefill [0-9]+ tokens in .*tokens/s\); decode 7 tokens in .*tokens/s" -- "${G[@]}" --prompt "the cat" --max-new-tokens 8
expect "generate chat" 0 "generate: prompt [0-9]+ tokens" -- "${G[@]}" --chat "hello there" --max-new-tokens 4
expect "generate sampling" 0 "temperature 0.8, top_p 0.9, seed 3" -- "${G[@]}" --prompt the --temperature 0.8 --top-p 0.9 --seed 3 --max-new-tokens 6
# automodel dataset: the samples a recipe trains on, as JSONL (the llama golden's tokenized_jsonl comes back as it went in)
expect "dataset no --out" 2 "--out DIR is required" -- "$BIN" dataset "$FIX/recipe.yaml"
expect "dataset writes" 0 "dataset: [0-9]+ samples" -- "$BIN" dataset "$FIX/recipe.yaml" --out "$T/ds"
if python3 - "$FIX/data.jsonl" "$T/ds/train.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
b = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
sys.exit(0 if len(a) == len(b) and all(x["input_ids"] == y["input_ids"] and x.get("labels", x["input_ids"]) == y["labels"] for x, y in zip(a, b)) else 1)
PY
then pass=$((pass + 1)); echo "ok   dataset: train.jsonl equals the recipe's tokenized_jsonl input"
else fail=$((fail + 1)); echo "FAIL dataset: train.jsonl differs from the recipe's input"; fi
# the tokenised-dataset cache (docs/datasets.md): the first run tokenises and caches, the second reads the cache
# and writes the same samples; AM_DATASET_CACHE=0 neither reads nor writes it
DSQ=(--dataset._target_=squad --dataset.path_or_dataset="$ROOT/tests/fixtures/data/squad_small.jsonl" --dataset.tokenizer="$ROOT/tests/fixtures/generate/tokenizer")
expect "dataset cache: miss, cached" 0 "tokenised dataset: 2 samples in .* cached to $AM_CACHE_DIR/datasets/[0-9a-f]{32}\.tokds" -- "$BIN" dataset "$FIX/recipe.yaml" "${DSQ[@]}" --out "$T/dsc1"
expect "dataset cache: hit" 0 "tokenised dataset: cache hit $AM_CACHE_DIR/datasets/[0-9a-f]{32}\.tokds" -- "$BIN" dataset "$FIX/recipe.yaml" "${DSQ[@]}" --out "$T/dsc2"
expect "dataset cache: hit gives the same samples" 0 "" -- cmp "$T/dsc1/train.jsonl" "$T/dsc2/train.jsonl"
out=$(AM_DATASET_CACHE=0 "$BIN" dataset "$FIX/recipe.yaml" "${DSQ[@]}" --out "$T/dsc3" 2>&1)
if grep -q "tokenised dataset: 2 samples in" <<<"$out" && ! grep -q "cache" <<<"$out" && cmp -s "$T/dsc1/train.jsonl" "$T/dsc3/train.jsonl"; then
  pass=$((pass + 1)); echo "ok   dataset cache: AM_DATASET_CACHE=0 tokenises without the cache"
else fail=$((fail + 1)); echo "FAIL dataset cache: AM_DATASET_CACHE=0:"; sed 's/^/     /' <<<"$out" | tail -5; fi
# nemotron_h (Mamba2 hybrid): on the CPU generate decodes from the conv/SSM state cache + the attention KV cache
# (docs/generate.md), and says so; without one (CUDA) it says it recomputes
GN="$T/gen_nemotron_h"
mkdir -p "$GN" && cp "$ROOT"/tests/fixtures/golden/nemotron_h/model/{config.json,generation_config.json,model.safetensors} "$ROOT"/tests/fixtures/generate/tokenizer/* "$GN/" 2>/dev/null
expect "generate nemotron_h (state cache)" 0 "decode 4 tokens in .* from the cache" -- "$BIN" generate --model "$GN" --device cpu --prompt "the cat" --max-new-tokens 5
# stdout is the text alone (logs on stderr), the same on every run; a seed fixes the sampled text
a=$("${G[@]}" --prompt "the cat" --max-new-tokens 12 2>/dev/null); b=$("${G[@]}" --prompt "the cat" --max-new-tokens 12 2>/dev/null)
s1=$("${G[@]}" --prompt "the cat" --max-new-tokens 12 --temperature 1 --seed 5 2>/dev/null)
s2=$("${G[@]}" --prompt "the cat" --max-new-tokens 12 --temperature 1 --seed 5 2>/dev/null)
if [ -n "$a" ] && [ "$a" = "$b" ] && [ -n "$s1" ] && [ "$s1" = "$s2" ] && ! grep -q "generate:" <<<"$a$s1"; then
  pass=$((pass + 1)); echo "ok   generate stdout: the text only, deterministic ($(printf %q "$a" | head -c 60))"
else
  fail=$((fail + 1)); echo "FAIL generate stdout: greedy '$a' / '$b', sampled '$s1' / '$s2'"
fi

# merge-lora (docs/lora.md): a PEFT adapter on q_proj/down_proj of the llama fixture, built and checked with
# Python's stdlib only: merged == fp32(W + fp32(fp32(B@A) * scale)), B@A summed in double (k ascending)
ML="$T/mergelora"
mkdir -p "$ML/adapter"
expect "merge-lora --help" 0 "usage: automodel merge-lora" -- "$BIN" merge-lora --help
expect "merge-lora unknown flag" 2 "unknown argument '--frob'" -- "$BIN" merge-lora --base "$FIX/model" --frob
expect "merge-lora missing adapter config" 1 "adapter_config.json: not found" -- "$BIN" merge-lora --base "$FIX/model" --adapter "$ML/adapter" --out "$ML/o0"
if python3 - "$FIX/model/model.safetensors" "$ML/adapter" <<'PY'
import json, struct, sys
src, out = sys.argv[1], sys.argv[2]
b = open(src, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
mods = {"model.layers.0.self_attn.q_proj": h["model.layers.0.self_attn.q_proj.weight"]["shape"],
        "model.layers.1.mlp.down_proj": h["model.layers.1.mlp.down_proj.weight"]["shape"]}
r, tensors = 4, {}
for j, (m, (o, i)) in enumerate(sorted(mods.items())):
    tensors["base_model.model.%s.lora_A.weight" % m] = ([r, i], [((x * 37 + j * 11) % 17 - 8) / 64.0 for x in range(r * i)])
    tensors["base_model.model.%s.lora_B.weight" % m] = ([o, r], [((x * 53 + j * 5) % 19 - 9) / 32.0 for x in range(o * r)])
hdr, data, off = {"__metadata__": {"format": "pt"}}, b"", 0
for k, (shape, vals) in sorted(tensors.items()):
    raw = struct.pack("<%df" % len(vals), *vals)
    hdr[k] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(raw)]}; data += raw; off += len(raw)
hb = json.dumps(hdr).encode(); hb += b" " * ((8 - len(hb) % 8) % 8)
open(out + "/adapter_model.safetensors", "wb").write(struct.pack("<Q", len(hb)) + hb + data)
json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 12, "use_rslora": True,
           "target_modules": ["q_proj", "down_proj"], "base_model_name_or_path": "llama"}, open(out + "/adapter_config.json", "w"))
PY
then
  expect "merge-lora runs" 0 "merge-lora: wrote .*20 tensors \(2 merged" -- "$BIN" merge-lora --base "$FIX/model" --adapter "$ML/adapter" --out "$ML/out"
  expect "merge-lora copies side files" 0 "generation_config.json" -- ls "$ML/out"
  expect "merge-lora result exact" 0 "^merged ok 2$" -- python3 - "$FIX/model/model.safetensors" "$ML/out/model.safetensors" "$ML/adapter/adapter_model.safetensors" <<'PY'
import json, math, struct, sys
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
    return {k: (v["shape"], struct.unpack("<%df" % (math.prod(v["shape"])), b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]))
            for k, v in h.items() if k != "__metadata__"}
f32 = lambda x: struct.unpack("<f", struct.pack("<f", x))[0]
base, out, ad = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3])
scale = f32(12 / math.sqrt(4)); ok = 0
for k in base:
    m = k[:-len(".weight")]
    if "base_model.model.%s.lora_A.weight" % m not in ad:
        assert out[k] == base[k], k; continue
    (r, i), A = ad["base_model.model.%s.lora_A.weight" % m]; (o, _), B = ad["base_model.model.%s.lora_B.weight" % m]
    W = base[k][1]
    for y in range(o):
        for x in range(i):
            acc = 0.0
            for t in range(r): acc += B[y * r + t] * A[t * i + x]
            want = f32(W[y * i + x] + f32(f32(acc) * scale))
            assert out[k][1][y * i + x] == want, (k, y, x, out[k][1][y * i + x], want)
    ok += 1
print("merged ok", ok)
PY
  expect "merge-lora refuses a non-empty --out" 2 "exists and is not empty" -- "$BIN" merge-lora --base "$FIX/model" --adapter "$ML/adapter" --out "$ML/out"
  mkdir -p "$ML/binonly" && cp "$ML/adapter/adapter_config.json" "$ML/binonly/" && echo pickle > "$ML/binonly/adapter_model.bin"
  expect "merge-lora refuses adapter_model.bin" 1 "adapter_model.bin: adapters saved as PyTorch pickle" -- "$BIN" merge-lora --base "$FIX/model" --adapter "$ML/binonly" --out "$ML/o2"
else
  echo "skip merge-lora end-to-end (python3 unavailable)"
fi

# LoRA training through the CLI (docs/lora.md): the HF PEFT goldens (tests/fixtures/lora_golden) per-step loss and
# grad norm as training.jsonl writes them, the PEFT adapter folder, and recipe errors with exit 2.
LG="$ROOT/tests/fixtures/lora_golden"
if command -v python3 >/dev/null; then
  for c in qwen3_moe llama; do
    expect "lora golden $c runs" 0 "^step 4 " -- "$BIN" finetune "$LG/$c/recipe.yaml" --checkpoint.checkpoint_dir="$T/lg_$c"
    expect "lora golden $c matches PEFT" 0 "^peft golden ok" -- python3 - "$LG/$c/expected.json" "$T/lg_$c" <<'PY'
import json, os, sys
exp = json.load(open(sys.argv[1]))["steps"]
got = [json.loads(l) for l in open(os.path.join(sys.argv[2], "training.jsonl"))]
assert len(got) == len(exp), (len(got), len(exp))
for e, g in zip(exp, got):
    assert abs(g["loss"] - e["loss"]) <= 1e-4 * abs(e["loss"]), (g["loss"], e["loss"])
    assert abs(g["grad_norm"] - e["grad_norm"]) <= 1e-3 * abs(e["grad_norm"]), (g["grad_norm"], e["grad_norm"])
cfg = json.load(open(os.path.join(sys.argv[2], "LATEST/model/adapter_config.json")))
assert cfg["peft_type"] == "LORA" and cfg["r"] == 4, cfg
assert os.path.exists(os.path.join(sys.argv[2], "LATEST/model/adapter_model.safetensors"))
assert os.path.exists(os.path.join(sys.argv[2], "LATEST/model/consolidated/model.safetensors"))
print("peft golden ok")
PY
  done
fi
expect "qlora runs (NF4 base, CPU)" 0 "QLoRA: 14 frozen Linear weights held in NF4" -- \
  "$BIN" finetune "$LG/llama/recipe.yaml" --checkpoint.checkpoint_dir="$T/lgq" --quantization.load_in_4bit=true
expect "qlora needs peft" 2 "add a peft section" -- "$BIN" finetune "$R" $CK --quantization.load_in_4bit=true
expect "peft rank disagrees with adapter" 2 "has rank 4 but peft.dim is 8" -- \
  "$BIN" finetune "$LG/llama/recipe.yaml" --checkpoint.checkpoint_dir="$T/lgx" --peft.dim=8
expect "peft targets disagree with adapter" 2 "adapts model.layers.0.self_attn.k_proj, which peft.target_modules does not select" -- \
  "$BIN" finetune "$LG/llama/recipe.yaml" --checkpoint.checkpoint_dir="$T/lgx" '--peft.target_modules=[q_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]'
expect "peft selects nothing" 2 "peft.target_modules selects no module of this model" -- \
  "$BIN" finetune "$R" $CK '--peft.target_modules=[nothing_here]'
expect "peft lm_head refused" 2 "LoRA on lm_head" -- "$BIN" finetune "$R" $CK '--peft.target_modules=[lm_head]'
expect "peft dora refused" 2 "DoRA training is not implemented" -- "$BIN" finetune "$R" $CK --peft.use_dora=true
expect "peft bad dropout_position" 2 "expected pre or post" -- "$BIN" finetune "$R" $CK --peft.dropout_position=middle
expect "peft adapter_path missing" 1 "peft.adapter_path.*no_adapter: adapter folder not found" -- "$BIN" finetune "$R" $CK --peft.adapter_path="$T/no_adapter"
expect "peft gate without up on MoE" 2 "names gate_proj without up_proj" -- \
  "$BIN" finetune "$ROOT/tests/fixtures/golden/qwen3_moe/recipe.yaml" --checkpoint.checkpoint_dir="$T/lgm" '--peft.target_modules=[gate_proj]'

# Watching a run (issue 18): redirected output has plain step lines and the summary, no bar; on a terminal
# (script(1) gives a pty) the bar draws and clears itself; training.svg is written; plot compares runs.
expect "summary at the end" 0 "^done: step 4 of 4 in" -- "$BIN" finetune "$R" --checkpoint.checkpoint_dir="$T/watch"
expect "no bar when redirected" 0 "^step 4 \| epoch 0" -- bash -c "'$BIN' finetune '$R' --checkpoint.checkpoint_dir='$T/watch2' | grep -c '\[=' | grep -qx 0 && echo 'step 4 | epoch 0'"
expect "training.svg written" 0 "training.svg" -- ls "$T/watch"
expect "log_every_steps 2 prints steps 1, 2, 4" 0 "^1 2 4$" -- bash -c "'$BIN' finetune '$R' --checkpoint.checkpoint_dir='$T/watch3' --step_scheduler.log_every_steps=2 | sed -n 's/^step \([0-9]*\) .*/\1/p' | paste -sd' '"
if command -v script >/dev/null; then
  expect "bar on a terminal" 0 "\] +100% step 4/4" -- env TERM=xterm script -qec "'$BIN' finetune '$R' --checkpoint.checkpoint_dir='$T/watch4'" /dev/null
fi
expect "tensorboard events = training.jsonl" 0 "^tb ok 4" -- bash -c "'$BIN' finetune '$R' --checkpoint.checkpoint_dir='$T/tbrun' --tensorboard.log_dir='$T/tb' >/dev/null 2>&1 && python3 '$ROOT/tools/read_tb_events.py' '$T'/tb/events.out.tfevents.* | python3 -c '
import json, struct, sys
ev = [json.loads(l) for l in sys.stdin]
tr = [json.loads(l) for l in open(\"$T/tbrun/training.jsonl\")]
f32 = lambda x: struct.unpack(\"f\", struct.pack(\"f\", x))[0]
n = 0
for t in tr:
    for tag, key in ((\"train/loss\", \"loss\"), (\"train/grad_norm\", \"grad_norm\"), (\"train/lr\", \"lr\")):
        assert any(e[\"tag\"] == tag and e[\"step\"] == t[\"step\"] and e[\"value\"] == f32(t[key]) for e in ev), (tag, t[\"step\"])
    n += 1
print(\"tb ok\", n)'"
expect "plot two runs" 0 "cmp.svg" -- "$BIN" plot "$T/watch" "$T/watch2" --out "$T/cmp.svg"
expect "plot missing run" 1 "training.jsonl" -- "$BIN" plot "$T/no_run"

echo "cli tests: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
