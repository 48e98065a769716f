#!/usr/bin/env bash
# One device call: bf16 vs fp32 residual stream (model.backend.residual_dtype), docs/performance.md.
#   bash bench/residual_dtype.sh [BUNDLE_DIR=.devbuild]
# 1. GPU op tests for RMSNorm (same and mixed dtypes) and add_ (mixed dtypes), vs the CPU reference;
# 2. 200-step loss parity: HF sdpa + HF eager (noise floor), the engine with the bf16 and the fp32 residual;
# 3. W1 speed / memory: engine bf16 residual, HF fp32 params + bf16 autocast, engine fp32 residual.
# Files under $OUT: log.txt (everything), the four loss curves, the two engine W1 json files.
set -uo pipefail
BUNDLE=${1:-.devbuild}
O=${OUT:-/tmp/resid}
mkdir -p "$O"
source tools/device_env.sh
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:$LD_LIBRARY_PATH"
ALT="--model.backend.residual_dtype=float32"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  echo "== GPU op tests (RMSNorm, add_)"
  timeout 240 "$BUNDLE/bin/am_gpu_tests" --gtest_filter='CudaOps.RmsNorm*:CudaOps.AddScaleCopy' 2>&1 |
    grep -E "^\[  (PASSED|FAILED) |FAILED  \]|OK \]|Failure|tests ran|error" | head -30
  echo "== 200-step parity (HF sdpa, HF eager, engine bf16 residual, engine fp32 residual)"
  start=$SECONDS
  OUT=/tmp/pout PARITY_NOISE=1 ENGINE_ALT="$ALT" bash bench/parity_200.sh "$BUNDLE"
  echo "parity took $((SECONDS - start)) s"
  echo "== W1"
  start=$SECONDS
  OUT=/tmp/bench HF_CONFIGS=fp32_autocast bash bench/run_bench.sh w1 "$BUNDLE"
  "$BUNDLE/bin/automodel" bench bench/w1.yaml $ALT --out /tmp/bench/w1/engine_f32.json > /tmp/bench/w1/engine_f32.log 2>&1
  echo "engine (fp32 residual) exit $?"; tail -3 /tmp/bench/w1/engine_f32.log
  python3 - /tmp/bench/w1 <<'PY'
import json, os, sys
d = sys.argv[1]
hf = [json.loads(l) for l in open(os.path.join(d, "hf.jsonl")) if l.strip() and "error" not in l]
print(f"\n{'W1':34s} {'tok/s':>9s} {'TFLOP/s':>8s} {'peak GiB':>9s} {'step ms':>8s} {'vs HF speed':>11s} {'vs HF mem':>9s}")
for name, f in (("engine, bf16 residual", "engine.json"), ("engine, fp32 residual", "engine_f32.json")):
    p = os.path.join(d, f)
    if not os.path.exists(p):
        print(f"{name:34s} missing"); continue
    e = json.load(open(p))
    r = "".join(f" {e['tokens_per_s']/h['tokens_per_s']:10.3f}x {e['peak_mem_gib']/h['peak_mem_gib']:8.3f}x" for h in hf[:1])
    print(f"{name:34s} {e['tokens_per_s']:9.0f} {e['tflops_per_gpu']:8.1f} {e['peak_mem_gib']:9.2f} {e['step_ms']:8.1f}{r}"
          f"   (fwd+bwd {e.get('fwd_bwd_ms', 0):.1f} ms, opt {e.get('opt_ms', 0):.1f} ms)")
for h in hf:
    print(f"{'HF ' + h['config']:34s} {h['tokens_per_s']:9.0f} {h['tflops']:8.1f} {h['peak_mem_gib']:9.2f} {h['step_ms']:8.1f}")
PY
  echo "W1 took $((SECONDS - start)) s"
} 2>&1 | tee "$O/log.txt"
cp /tmp/p200/hf_training.jsonl /tmp/p200/hf_eager_training.jsonl "$O/" 2>/dev/null
cp /tmp/p200/engine/training.jsonl "$O/engine_bf16res_training.jsonl" 2>/dev/null
cp /tmp/p200/engine_alt/training.jsonl "$O/engine_f32res_training.jsonl" 2>/dev/null
cp /tmp/bench/w1/engine.json "$O/w1_engine_bf16res.json" 2>/dev/null
cp /tmp/bench/w1/engine_f32.json "$O/w1_engine_f32res.json" 2>/dev/null
