#!/usr/bin/env bash
# 200-step loss-curve parity, engine vs HF, same initial weights and data, one device call.
#   bash bench/parity_200.sh [BUNDLE_DIR=.devbuild]
set -uo pipefail
BUNDLE=${1:-.devbuild}
D=/tmp/p200
rm -rf $D && mkdir -p $D
source tools/device_env.sh
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:$LD_LIBRARY_PATH"
PYTHONUNBUFFERED=1 python3 tools/hf_parity_200.py $D 200 8 3e-4 ${PARITY_NOISE:+noise} 2>$D/hf.err || tail -5 $D/hf.err
cat > $D/recipe.yaml <<YAML
seed: 1
device: cuda
model: {pretrained_model_name_or_path: $D/model}
step_scheduler: {global_batch_size: 8, local_batch_size: 8, num_epochs: 4, max_steps: 200}
dataset: {_target_: tokenized_jsonl, path_or_dataset: $PWD/examples/demo/gsm8k_train_512.tokenized.jsonl}
dataloader: {shuffle: false}
optimizer: {_target_: torch.optim.AdamW, lr: 3.0e-4, betas: [0.9, 0.999], eps: 1.0e-8, weight_decay: 0.0}
clip_grad_norm: {max_norm: 1.0}
checkpoint: {enabled: false, checkpoint_dir: $D/engine}
YAML
"$BUNDLE/bin/automodel" finetune $D/recipe.yaml > $D/engine.log 2>&1 || tail -5 $D/engine.log
python3 - $D <<'PY'
import json, sys
d = sys.argv[1]
hf = [json.loads(l) for l in open(f"{d}/hf_training.jsonl")]
en = [json.loads(l) for l in open(f"{d}/engine/training.jsonl")]
worst = 0.0
print(f"{'step':>5s} {'HF loss':>9s} {'engine':>9s} {'rel diff':>9s}")
for h, e in zip(hf, en):
    r = abs(h["loss"] - e["loss"]) / h["loss"]
    worst = max(worst, r)
    if h["step"] % 20 == 0 or h["step"] <= 3:
        print(f"{h['step']:5d} {h['loss']:9.4f} {e['loss']:9.4f} {100*r:8.3f}%")
print(f"steps compared: {min(len(hf), len(en))}; worst relative loss difference {100*worst:.3f}% (target < 2%)")
import os
if os.path.exists(f"{d}/hf_eager_training.jsonl"):
    he = [json.loads(l) for l in open(f"{d}/hf_eager_training.jsonl")]
    rel = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(hf, he)]
    wi = max(range(len(rel)), key=lambda i: rel[i])
    print(f"noise floor: HF sdpa vs HF eager (same weights, data, optimizer): worst {100*rel[wi]:.3f}% at step {wi+1}; "
          f"steps over 2%: {sum(r > 0.02 for r in rel)}")
    re = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(hf, en)]
    print(f"engine vs HF sdpa: steps over 2%: {sum(r > 0.02 for r in re)}; worst at step {max(range(len(re)), key=lambda i: re[i]) + 1}")
PY
cp $D/hf_training.jsonl $D/engine/training.jsonl ${OUT:-/tmp}/ 2>/dev/null
cp $D/hf_eager_training.jsonl ${OUT:-/tmp}/ 2>/dev/null
