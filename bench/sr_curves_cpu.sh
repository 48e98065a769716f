#!/usr/bin/env bash
# Issue 15 item 1, the CPU stand-in (no GPU needed): does stochastic rounding keep pure bf16 on the fp32-master
# curve where round-to-nearest loses the updates? A small random llama (2 layers, hidden 128, the GSM8K demo's
# 32,000-token vocabulary) fine-tuned on examples/demo/gsm8k_train_512.tokenized.jsonl in file order, AdamW at a
# learning rate whose updates (~lr per step) are far below half a bf16 ulp of most weights (init std 0.02: ulp
# 1.2e-4), three ways: fp32 masters, model.dtype bfloat16 with torch's rounding, and with
# optimizer.stochastic_rounding. Prints the curves every 10 steps and each bf16 run's mean |loss - fp32 loss|.
# The GPU version with HF's bf16 curve beside it is `bash bench/device_session.sh parity_bf16` (W1's shape).
#   bash bench/sr_curves_cpu.sh [AUTOMODEL=build-cpu/bin/automodel] [STEPS=100] [LR=1e-5]
set -euo pipefail
BIN=${1:-build-cpu/bin/automodel}
STEPS=${2:-100}
LR=${3:-1.0e-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
cat > "$D/config.json" <<JSON
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 128,
 "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
 "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "tie_word_embeddings": false, "initializer_range": 0.02, "torch_dtype": "float32"}
JSON
cat > "$D/recipe.yaml" <<YAML
seed: 1
device: cpu
model: {config: config.json}
step_scheduler: {global_batch_size: 4, local_batch_size: 4, max_steps: $STEPS}
dataset: {_target_: tokenized_jsonl, path_or_dataset: $ROOT/examples/demo/gsm8k_train_512.tokenized.jsonl}
dataloader: {shuffle: false}
optimizer: {_target_: torch.optim.AdamW, lr: $LR, betas: [0.9, 0.999], eps: 1.0e-8, weight_decay: 0.0}
clip_grad_norm: {max_norm: 1.0}
checkpoint: {enabled: false}
YAML
run() {  # name, overrides...
  local name=$1; shift
  "$BIN" finetune "$D/recipe.yaml" --checkpoint.checkpoint_dir="$D/$name" "$@" > "$D/$name.log" 2>&1 ||
    { tail -5 "$D/$name.log"; exit 1; }
}
run fp32
run nearest --model.dtype=bfloat16
run sr --model.dtype=bfloat16 --optimizer.stochastic_rounding=true
python3 - "$D" <<'PY'
import json, sys
d = sys.argv[1]
c = {n: [json.loads(l)["loss"] for l in open(f"{d}/{n}/training.jsonl")] for n in ("fp32", "nearest", "sr")}
print(f"{'step':>5s} {'fp32':>9s} {'bf16 nearest':>13s} {'bf16 SR':>9s}")
for i in range(len(c["fp32"])):
    if i == 0 or (i + 1) % 10 == 0:
        print(f"{i + 1:5d} {c['fp32'][i]:9.4f} {c['nearest'][i]:13.4f} {c['sr'][i]:9.4f}")
for n in ("nearest", "sr"):
    dev = [abs(a - b) for a, b in zip(c[n], c["fp32"])]
    print(f"{n:8s}: mean |loss - fp32 loss| {sum(dev) / len(dev):.4f}, at the last step {dev[-1]:.4f}")
print(f"fp32 moved {c['fp32'][0] - c['fp32'][-1]:.4f} over the run")
PY
