#!/usr/bin/env bash
# Correctness on the GPU machine in one call (no timings): make the HF-side fixtures, compare the engine with
# them right there, run the GPU op tests against the CPU oracle, and train every golden case on CUDA.
#   tools/device_bundle.sh build-cuda    (here), then on the device, carrying .devpack (+ .tbcheck):
#   TB_CHECK=.tbcheck bash bench/correctness_device_check.sh
# Comes back under $OUT (at most 8 files): summary.txt, fixtures.tgz (new/changed tests/fixtures files, to
# commit after review), logs.tgz.
set -uo pipefail
O=${OUT:-/tmp/correctness}
L=/tmp/correctness_logs
mkdir -p "$O" "$L" .devbuild
[ -x .devbuild/bin/automodel ] || tar xJf .devpack/bundle.tar.xz -C .devbuild
source tools/device_env.sh
B=.devbuild/bin
# This call exists to check the CUDA kernels not yet run on a GPU (generic attention, gemma2 / gpt_oss / deepseek /
# nemotron_h): turn them on (ops/device.h); the default paths were checked before.
export AM_ALLOW_UNVERIFIED_CUDA=1
# The test binaries find fixtures under the source dir they were built from (AM_SOURCE_DIR=/work/main).
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. HF fixtures (fp32 goldens of the new families, generate goldens, bf16 goldens, TensorBoard read-back).
OUT=$L bash bench/hf_fixtures_device.sh
cp "$L/fixtures.tgz" "$O/" 2>/dev/null

# 2. The engine (CPU reference) against the fixtures just made.
echo "== engine (CPU) vs HF: HfGolden, GenerateHfGoldens, Bf16 goldens config"
timeout 120 $B/am_tests --gtest_filter='Families/HfGolden.*:GenerateHfGoldens.*:Families/GenerateFamilies.*:HfGoldenConfig.*' \
  > "$L/engine_vs_hf.log" 2>&1
echo "exit $?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]" "$L/engine_vs_hf.log" | head -30

# 3. GPU op tests (CUDA vs the CPU oracle).
echo "== GPU op tests"
timeout 240 $B/am_gpu_tests > "$L/gpu_tests.log" 2>&1
echo "exit $?"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|tests ran" "$L/gpu_tests.log" | head -30

# 4. Every golden case trained on CUDA (bf16 compute, fp32 master) vs the HF fp32 loss.
echo "== golden cases on CUDA: loss vs HF fp32"
L=$L B=$B bash bench/goldens_cuda_check.sh
tar czf "$O/logs.tgz" -C "$L" .
