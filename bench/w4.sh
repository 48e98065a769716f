#!/usr/bin/env bash
# BENCH.md W4, the seed tutorial end to end, engine and HF in one device call (issue 14): AutoModel's
# llama3_2_1b_squad.yaml as written (examples/llama3_2/), with only the model (a random Llama-3.2-1B, bench/w1_config.json),
# the tokenizer (the real Llama 3 one) and the dataset (SQuAD v1.1 dev, ../shared/datasets/squad) pointed at local
# files, and checkpoints off on both sides. Wall time is from each command's start to its end (start-up, tokenisation
# and the epoch); the engine runs padded as written and with packed_sequence_size 2048; HF Trainer(bf16=True) trains
# on the samples `automodel dataset` writes from the same recipe (bench/hf_w4.py), so its tokenisation is not in its
# time (in our favour of nothing: theirs is left out).
#   tools/device_bundle.sh build-cuda (+ the packs below), then on the device:  bash bench/w4.sh [BUNDLE_DIR=.devbuild]
# Inputs: W4_TOKENIZER (a folder with tokenizer.json; default .cache/tokenizers/llama3_1, or .devpack/tokenizer_llama3_1.tar.xz),
#         W4_SQUAD (default ../shared/datasets/squad/dev-v1.1.rebuilt.json, or .devpack/squad_dev.json.xz).
# Tokenised-dataset cache (docs/datasets.md): an empty one in $OUTDIR/am_cache, so engine_padded tokenises (cold, as a
# first run does) and engine_packed and `automodel dataset` read what it cached (warm); the "tokenised dataset:" lines
# of each log are printed. W4_CACHE=0 turns the cache off for every run.
set -uo pipefail
BUNDLE=${1:-.devbuild}
OUTDIR=${OUT:-/tmp/bench}/w4
mkdir -p "$OUTDIR"
source tools/device_env.sh
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:$LD_LIBRARY_PATH"
TOK=${W4_TOKENIZER:-.cache/tokenizers/llama3_1}
if [ ! -f "$TOK/tokenizer.json" ] && [ -f .devpack/tokenizer_llama3_1.tar.xz ]; then
  mkdir -p "$TOK" && tar xJf .devpack/tokenizer_llama3_1.tar.xz -C "$TOK"
fi
SQUAD=${W4_SQUAD:-../shared/datasets/squad/dev-v1.1.rebuilt.json}
if [ ! -f "$SQUAD" ] && [ -f .devpack/squad_dev.json.xz ]; then SQUAD=/tmp/squad_dev.json; xz -dc .devpack/squad_dev.json.xz > "$SQUAD"; fi
R=examples/llama3_2/llama3_2_1b_squad.yaml
O=(--model._target_=nemo_automodel.NeMoAutoModelForCausalLM.from_config --model.pretrained_model_name_or_path=null
   --model.config=bench/w1_config.json --model.tokenizer="$TOK" --dataset.dataset_name="$SQUAD"
   --validation_dataset.dataset_name="$SQUAD" --checkpoint.enabled=false --device=cuda)
A="$BUNDLE/bin/automodel"
export AM_CACHE_DIR="$OUTDIR/am_cache"
rm -rf "$AM_CACHE_DIR"
[ "${W4_CACHE:-1}" = 0 ] && export AM_DATASET_CACHE=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
run_engine() {  # name, extra overrides...
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$A" finetune "$R" "${O[@]}" --checkpoint.checkpoint_dir="$OUTDIR/$name" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  t1=$(date +%s.%N)
  grep -hE "tokenised dataset|^start-up|^time:" "$OUTDIR/$name.log" | sed "s/^/$name: /" >&2
  python3 - "$OUTDIR/$name" "$name" "$rc" "$t0" "$t1" <<'PY'
import json, sys, os
d, name, rc, t0, t1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
steps = [json.loads(l) for l in open(os.path.join(d, "training.jsonl"))] if os.path.exists(os.path.join(d, "training.jsonl")) else []
tok = sum(s.get("num_tokens", 0) for s in steps)
print(json.dumps({"side": "engine", "run": name, "exit": rc, "wall_s": t1 - t0, "steps": len(steps), "tokens": tok,
                  "train_s": sum(s.get("time_s", 0) for s in steps), "peak_mem_gib": max([s.get("mem_gib", 0) for s in steps] or [0]),
                  "loss": steps[-1]["loss"] if steps else None}))
PY
}
run_engine engine_padded | tee "$OUTDIR/engine_padded.json"
run_engine engine_packed --packed_sequence.packed_sequence_size=2048 | tee "$OUTDIR/engine_packed.json"
"$A" dataset "$R" "${O[@]}" --out "$OUTDIR/data" > "$OUTDIR/dataset.log" 2>&1 || { echo "automodel dataset failed"; tail -3 "$OUTDIR/dataset.log"; }
t0=$(date +%s.%N)
PYTHONUNBUFFERED=1 python3 bench/hf_w4.py "$OUTDIR/data" bench/w1_config.json 2> "$OUTDIR/hf.err" | tail -1 > "$OUTDIR/hf.json"
t1=$(date +%s.%N)
python3 - "$OUTDIR" "$t0" "$t1" <<'PY'
import json, sys, os
d, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def load(n):
    try: return json.load(open(os.path.join(d, n)))
    except Exception: return None
hf = load("hf.json")
if hf: hf["wall_s"] = t1 - t0
print(f"\nW4 {'wall s':>8} {'train s':>8} {'real tok/s':>11} {'peak GiB':>9} {'loss':>7}")
for n in ("engine_padded.json", "engine_packed.json"):
    e = load(n)
    if e: print(f"{e['run']:14s} {e['wall_s']:8.1f} {e['train_s']:8.1f} {e['tokens'] / max(e['train_s'], 1e-9):11.0f} {e['peak_mem_gib']:9.2f} {e['loss'] or 0:7.4f}  (exit {e['exit']})")
if hf:
    print(f"{'HF Trainer':14s} {hf['wall_s']:8.1f} {hf['train_runtime_s']:8.1f} {hf['tokens_per_s']:11.0f} {hf['peak_mem_gib']:9.2f} {hf['loss']:7.4f}")
    for n, target in (("engine_padded.json", 2.3), ("engine_packed.json", 3.5)):
        e = load(n)
        if e: print(f"{e['run']}: HF wall / ours {hf['wall_s'] / e['wall_s']:.2f}x (target >= {target}x), memory {e['peak_mem_gib'] / hf['peak_mem_gib']:.2f}x (target <= 0.75x)")
else:
    print("HF side failed:"); print(open(os.path.join(d, "hf.err")).read()[-1500:])
PY
