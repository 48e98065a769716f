#!/usr/bin/env bash
# One device call: GPU op tests, CUDA-vs-HF golden losses on the tiny fixtures (dense and MoE), then the
# workloads named (default: w1), engine + HF each.
#   bash bench/device_check.sh [w1] [w2]   (expects .devpack/bundle.tar.xz from tools/device_bundle.sh)
#   GPU_TEST_FILTER=... limits the GPU op tests (gtest filter).
set -uo pipefail
OUTDIR=${OUT:-/tmp/devcheck}
mkdir -p .devbuild "$OUTDIR" && tar xJf .devpack/bundle.tar.xz -C .devbuild
source tools/device_env.sh
B=.devbuild/bin
echo "== GPU op tests"
timeout 300 $B/am_gpu_tests --gtest_filter="${GPU_TEST_FILTER:-*}" 2>&1 | tee "$OUTDIR/gpu_tests.log" | grep -E "^\[  (PASSED|FAILED) |FAILED  \]|tests ran" | head -20
echo "== golden fixtures on CUDA (bf16 compute, fp32 master): loss vs HF fp32"
for c in $(python3 -c "import json;print(' '.join(json.load(open('tests/fixtures/golden/index.json'))['cases']))"); do
  timeout 60 $B/automodel finetune tests/fixtures/golden/$c/recipe.yaml --device=cuda --checkpoint.checkpoint_dir=/tmp/gc_$c > "$OUTDIR/golden_$c.log" 2>&1 || { echo "$c: FAILED"; tail -3 "$OUTDIR/golden_$c.log"; continue; }
  python3 - $c <<'PY'
import json, sys
c = sys.argv[1]
exp = json.load(open(f"tests/fixtures/golden/{c}/expected.json"))["steps"]
got = [json.loads(l) for l in open(f"/tmp/gc_{c}/training.jsonl")]
print(c, " ".join(f"s{e['step']}: loss {g['loss']:.4f}/{e['loss']:.4f} ({100*abs(g['loss']-e['loss'])/e['loss']:.2f}%) gn {g['grad_norm']:.3f}/{e['grad_norm']:.3f}" for e, g in zip(exp, got)))
PY
done
for w in ${@:-w1}; do
  echo "== ${w^^}"
  bash bench/run_bench.sh "$w" .devbuild
done
