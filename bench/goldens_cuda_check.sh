#!/usr/bin/env bash
# Every HF golden case (tests/fixtures/golden/index.json) trained on CUDA (bf16 compute, fp32 master) and its
# per-step loss compared with HF's fp32 loss; one line per case. On the device, after tools/device_env.sh:
#   L=LOG_DIR B=BIN_DIR bash bench/goldens_cuda_check.sh [CASE...]
set -uo pipefail
L=${L:-/tmp/goldens_cuda}
B=${B:-.devbuild/bin}
mkdir -p "$L"
cases=("$@")
[ ${#cases[@]} -gt 0 ] || read -ra cases <<< "$(python3 -c "import json;print(' '.join(json.load(open('tests/fixtures/golden/index.json'))['cases']))")"
for c in "${cases[@]}"; do
  rm -rf "/tmp/gc_$c"
  timeout 90 "$B/automodel" finetune "tests/fixtures/golden/$c/recipe.yaml" --device=cuda --checkpoint.checkpoint_dir="/tmp/gc_$c" \
    > "$L/golden_cuda_$c.log" 2>&1 || { echo "$c: exit $? $(grep -m1 -iE 'error|not implemented|not verified' "$L/golden_cuda_$c.log")"; continue; }
  python3 - "$c" <<'PY'
import json, sys
c = sys.argv[1]
exp = json.load(open(f"tests/fixtures/golden/{c}/expected.json"))["steps"]
got = [json.loads(l) for l in open(f"/tmp/gc_{c}/training.jsonl")]
err = max(abs(g["loss"] - e["loss"]) / e["loss"] for e, g in zip(exp, got))
gn = max(abs(g["grad_norm"] - e["grad_norm"]) / e["grad_norm"] for e, g in zip(exp, got))
print(f"{c}: {len(got)} steps, max rel err vs HF fp32: loss {err:.2e}, grad norm {gn:.2e}")
PY
done
