#!/usr/bin/env bash
# Issue 12 on the GPU machine, one call: LoRA/QLoRA/NF4/dropout GPU tests against the CPU oracle, W5 (engine
# vs HF PEFT in the same call), the QLoRA 8B memory claim, and the HF goldens that need torch (generate, NF4
# vs bitsandbytes). Most important first: a timeout only loses the tail.
#   tools/device_bundle.sh build-cuda; then on the device (carry .devpack): bash bench/lora_device_check.sh
set -uo pipefail
O=${OUT:-/tmp/lora_check}
mkdir -p "$O" .devbuild
[ -d .devbuild/bin ] || tar xJf .devpack/bundle.tar.xz -C .devbuild
source tools/device_env.sh
# The test binaries find fixtures under the source dir they were built from (AM_SOURCE_DIR=/work/main).
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$O/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" > "$O/versions.txt" 2>&1
python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" >> "$O/versions.txt" 2>&1
cat "$O/versions.txt"

# 1. GPU tests (CUDA vs CPU): LoRA training, dropout masks, frozen-weight ops, NF4 kernels (GPU_TESTS=0 skips:
#    bench/correctness_device_check.sh runs them all).
[ "${GPU_TESTS:-1}" = 0 ] || timeout 150 .devbuild/bin/am_gpu_tests --gtest_filter='CudaLora*:*Nf4*:*Dropout*:*Frozen*' > "$O/gpu_tests.log" 2>&1
[ "${GPU_TESTS:-1}" = 0 ] || echo "gpu tests exit $?"; [ "${GPU_TESTS:-1}" = 0 ] || grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|final adapter|step 1 loss" "$O/gpu_tests.log" | head -30

# 2. W5: engine vs HF PEFT (bf16 base, LoRA r 8 on *_proj).
OUT="$O" timeout 170 bash bench/run_bench.sh w5 .devbuild 2>&1 | tail -5

# 3. QLoRA memory: Llama-3.1-8B shape, 4 x 512, r 16, activation checkpointing, NF4 + double quant.
timeout 150 .devbuild/bin/automodel bench bench/qlora_8b.yaml --out "$O/qlora_8b.json" > "$O/qlora_8b.log" 2>&1
echo "qlora 8b exit $?"; tail -2 "$O/qlora_8b.log"

# 4. NF4 vs bitsandbytes, HF generate goldens (tiny families + W1-shaped Llama) and our CPU generate on them.
# bitsandbytes is not installed there: BNB_SRC=DIR (a source tree, carried) is built for sm_90 first.
if [ -n "${BNB_SRC:-}" ]; then
  ( cmake -S "$BNB_SRC" -B /tmp/bnb_build -DCOMPUTE_BACKEND=cuda -DCOMPUTE_CAPABILITY=90 -DCMAKE_BUILD_TYPE=Release &&
    cmake --build /tmp/bnb_build -j16 ) > "$O/bnb_build.log" 2>&1
  echo "bitsandbytes build exit $?"; export PYTHONPATH="$PWD/$BNB_SRC${PYTHONPATH:+:$PYTHONPATH}"
fi
timeout 40 python3 tools/make_nf4_golden.py --out "$O/nf4" > "$O/nf4_golden.log" 2>&1
echo "nf4 golden exit $?"; tail -2 "$O/nf4_golden.log"
timeout 100 python3 tools/make_generate_goldens.py --new-tokens 32 ${GEN_CASES:+--cases $GEN_CASES} > "$O/generate_goldens.log" 2>&1
echo "generate goldens exit $?"; tail -1 "$O/generate_goldens.log"
mkdir -p "$O/generate" && cp tests/fixtures/generate/golden_*.json .cache/generate_goldens/golden_w1_llama.json "$O/generate/" 2>/dev/null
timeout 60 .devbuild/bin/am_tests --gtest_filter='GenerateHfGoldens.*:GenerateCuda.*:AttentionKvCuda.*' > "$O/generate_cpu.log" 2>&1
echo "generate vs HF (CPU) exit $?"; grep -E "OK|FAILED|note" "$O/generate_cpu.log" | head -5
