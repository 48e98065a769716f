#!/usr/bin/env bash
# A BENCH.md workload on the GPU machine, engine and HF in one call; prints the ratio table.
#   bash bench/run_bench.sh w1|w2|w2bf16|w2inbwd|w2bf16inbwd|w5|nemo8 [BUNDLE_DIR=.devbuild]
#   (BUNDLE_DIR from tools/device_bundle.sh)
# w2bf16 is W2 with model.dtype: bfloat16 (pure bf16, docs/precision.md) against HF's bf16 configuration;
# w2inbwd / w2bf16inbwd add optimizer_in_bwd: true (each layer updated inside backward, docs/precision.md).
# HF_CONFIGS_W1 / HF_CONFIGS_W2 (or HF_CONFIGS for any) override the HF configurations (bench/hf_bench.py).
set -uo pipefail
W=${1:?usage: run_bench.sh w1|w2|w2bf16|w2inbwd|w2bf16inbwd|w5|nemo8 [BUNDLE_DIR]}
BUNDLE=${2:-.devbuild}
Y=$W
ENGINE_ARGS=()
case "$W" in
  w1) B=4; T=2048; DEF="fp32_autocast,bf16,bf16_compile" ;;
  w2) B=1; T=4096; DEF="bf16_grouped_mm,fp32_autocast_grouped_mm" ;;
  w2bf16) B=1; T=4096; DEF="bf16_grouped_mm"; Y=w2; ENGINE_ARGS=(--model.dtype=bfloat16) ;;
  # optimizer_in_bwd (train/optimizer_in_bwd.h): each layer updated inside backward, no whole-model gradient
  w2inbwd) B=1; T=4096; DEF="fp32_autocast_grouped_mm"; Y=w2; ENGINE_ARGS=(--optimizer_in_bwd=true) ;;
  w2bf16inbwd) B=1; T=4096; DEF="bf16_grouped_mm"; Y=w2; ENGINE_ARGS=(--model.dtype=bfloat16 --optimizer_in_bwd=true) ;;
  w5) B=4; T=2048; DEF="peft_bf16" ;;
  nemo8) B=1; T=4096; DEF="fp32_autocast_grouped_mm,bf16_grouped_mm" ;;  # issue 17: Nemotron-3-Nano, 8 blocks
  *) echo "unknown workload $W" >&2; exit 2 ;;
esac
OUTDIR=${OUT:-/tmp/bench}/$W
mkdir -p "$OUTDIR"
source tools/device_env.sh
export AM_TRACE_TIMES=${AM_TRACE_TIMES:-1}  # the engine's per-span GPU times (ops/trace.h) go into engine.json
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUTDIR/gpu.txt"
"$BUNDLE/bin/automodel" bench "bench/$Y.yaml" "${ENGINE_ARGS[@]}" --out "$OUTDIR/engine.json" > "$OUTDIR/engine.log" 2>&1
echo "engine exit $?"; tail -5 "$OUTDIR/engine.log"
HFV=HF_CONFIGS_${W^^}
PYTHONUNBUFFERED=1 python3 bench/hf_bench.py "bench/${Y}_config.json" $B $T "${!HFV:-${HF_CONFIGS:-$DEF}}" 2>"$OUTDIR/hf.err" | tee "$OUTDIR/hf.jsonl"
tail -3 "$OUTDIR/hf.err"
python3 - "$OUTDIR" "$W" <<'PY'
import json, sys, os
d, w = sys.argv[1], sys.argv[2].upper()
e = json.load(open(os.path.join(d, "engine.json"))) if os.path.exists(os.path.join(d, "engine.json")) else None
hf = [json.loads(l) for l in open(os.path.join(d, "hf.jsonl")) if l.strip()]
print(f"\n{w:32s} {'tok/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} {'step ms':>8s}")
if e:
    print(f"{'automodel.cpp':32s} {e['tokens_per_s']:9.0f} {e['tflops_per_gpu']:8.1f} {100*(e['mfu'] or 0):5.1f}% {e['peak_mem_gib']:9.2f} {e['step_ms']:8.1f}"
          f"   fwd+bwd {e.get('fwd_bwd_ms', 0):.1f} ms, opt {e.get('opt_ms', 0):.1f} ms")
for h in hf:
    if "error" in h:
        print(f"{'HF ' + h['config']:32s} error {h['error']}"); continue
    tf = h.get("tflops")
    print(f"{'HF ' + h['config']:32s} {h['tokens_per_s']:9.0f} {tf or 0:8.1f} {100*(tf or 0)/989:5.1f}% {h['peak_mem_gib']:9.2f} {h['step_ms']:8.1f}"
          + (f"   Mamba2: {h['mamba_path']}" if h.get("mamba_path") else ""))
if e and e.get("gpu_time_per_step"):
    print("\nengine GPU time per timed step (CUDA events around each span; nested spans overlap):")
    for k, v in sorted(e["gpu_time_per_step"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
        print(f"  {k:32s} {v['ms_per_step']:8.2f} ms  ({v['calls_per_step']:.0f} per step)")
if e:
    for h in hf:
        if "error" in h: continue
        print(f"ratio vs HF {h['config']:24s} speed {e['tokens_per_s']/h['tokens_per_s']:.2f}x   memory {e['peak_mem_gib']/h['peak_mem_gib']:.2f}x")
PY
