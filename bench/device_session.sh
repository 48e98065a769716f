#!/usr/bin/env bash
# Several device checks in one call, each stage with its own time limit, everything packed after each stage so
# a call stopped at its limit still returns what finished (the device tool returns at most 8 files from $OUT).
#   tools/device_bundle.sh build-cuda   (here), then on the device, carrying .devpack (+ .tbcheck, .bnb):
#   bash bench/device_session.sh STAGE...     stages, in the order given:
#     correctness   bench/correctness_device_check.sh (HF fixtures + engine vs them, all GPU tests, goldens on CUDA)
#     w5            bench/run_bench.sh w5 (engine LoRA vs HF PEFT)
#     qlora8b       the QLoRA 8B memory claim (bench/qlora_8b.yaml)
#     nf4           NF4 goldens from bitsandbytes (built from the carried .bnb source) + engine vs them
#     gen_w1        HF generate golden on the W1-shaped Llama + the engine's CPU/CUDA generate vs it
#     w1 | w2 | w2bf16 | w2inbwd | w2bf16inbwd | w5 | nemo8   bench/run_bench.sh (w2bf16: W2 in pure bf16;
#                   *inbwd: with optimizer_in_bwd; nemo8: issue 17's Nemotron row)
#     goldens_cuda  bench/goldens_cuda_check.sh: every HF golden case trained on CUDA vs HF's fp32 loss
#     qexport       MXFP4 / FP8 sources through the engine, the bf16 export loaded by transformers (issue 16)
#     gpu_tests     am_gpu_tests (GPU_FILTER=gtest filter, default all; GPU_LIMIT seconds, default 240)
#     mamba2        Mamba2 GPU tests (chunked SSD + sequential scans vs the CPU) + am_gpu_microbench mamba2
#     mamba2prof    Nsight Compute sections of each chunked-SSD kernel (one forward + backward at nemo8's mixer)
#     fusedproj     fused q|k|v / gate|up: GPU tests, micro-benchmark, W1 engine with AM_FUSED_PROJ=0 and 1
#     addnorm       fused residual add + RMSNorm: GPU tests, micro-benchmark, W1 engine with AM_FUSED_ADD_NORM=0 and 1
#     ab            engine-only A/B of opt-in switches (AB_RUNS="w1:- w1:AM_ATTENTION=cudnn ...")
#     phi3diag      tools/phi3_longrope_diag.py (HF phi3 logits cached / full / no LongRoPE, per position)
#     w4            bench/w4.sh: the seed tutorial end to end, engine (padded, packed) and HF Trainer
#     parity_bf16   bench/parity_200.sh with PARITY_BF16=1 (issue 15's SR / nearest / HF bf16 curves)
#     w5trace       W5's engine step with AM_TRACE_TIMES=1: GPU time per layer / LM head / optimizer
#     w1prof | w5prof  per-kernel times of W1's / W5's engine step (Nsight Compute, serialised; sum vs step_ms)
#     micro         am_gpu_microbench entries (MICRO="attention_sinks;moe --persistent", ';'-separated)
#     sinks         am_gpu_microbench attention_sinks (flash with sinks vs the generic kernels)
#     moegemm       the persistent grouped expert GEMM: GPU tests, am_gpu_microbench moe --persistent, W2 engine
#                   with AM_MOE_GEMM unset and =persistent
# Returns $OUT/summary.txt (also the call's output), $OUT/results.tgz (all logs, new fixtures under fixtures/).
set -uo pipefail
O=${OUT:-/tmp/device_session}
R=/tmp/device_session_results
mkdir -p "$O" "$R" .devbuild
[ -x .devbuild/bin/automodel ] || tar xJf .devpack/bundle.tar.xz -C .devbuild
source tools/device_env.sh
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }  # AM_SOURCE_DIR of the test binaries
B=.devbuild/bin
export AM_ALLOW_UNVERIFIED_CUDA=1  # device runs are where the kernels not yet run on a GPU get checked (ops/device.h)
pack() { tar czf "$O/results.tgz" -C "$R" . 2>/dev/null; }
stage() { echo; echo "######## $1 ($(date +%T))"; }

for s in "$@"; do
  case "$s" in
    correctness)
      stage correctness
      OUT="$R/correctness" timeout ${CORRECTNESS_LIMIT:-330} bash bench/correctness_device_check.sh ;;
    qlora8b)
      stage qlora8b
      timeout 150 $B/automodel bench bench/qlora_8b.yaml --out "$R/qlora_8b.json" > "$R/qlora_8b.log" 2>&1
      echo "exit $?"; tail -3 "$R/qlora_8b.log" ;;
    nf4)
      stage nf4
      [ -d .bnb ] || [ ! -f .devpack/bnb.tar.xz ] || tar xJf .devpack/bnb.tar.xz
      if [ -d .bnb ]; then
        ( cmake -S .bnb -B /tmp/bnb_build -DCOMPUTE_BACKEND=cuda -DCOMPUTE_CAPABILITY=90 -DCMAKE_BUILD_TYPE=Release &&
          cmake --build /tmp/bnb_build -j16 ) > "$R/bnb_build.log" 2>&1
        echo "bitsandbytes build exit $?"
        export PYTHONPATH="$PWD/.bnb${PYTHONPATH:+:$PYTHONPATH}"
      fi
      timeout 60 python3 tools/make_nf4_golden.py > "$R/nf4_golden.log" 2>&1
      echo "nf4 golden exit $?"; tail -2 "$R/nf4_golden.log"
      mkdir -p "$R/fixtures" && cp -r tests/fixtures/nf4 "$R/fixtures/" 2>/dev/null
      timeout 60 $B/am_tests --gtest_filter='Nf4Golden*' > "$R/nf4_engine.log" 2>&1
      echo "engine vs bitsandbytes exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED  \]" "$R/nf4_engine.log" | head
      timeout 60 $B/am_gpu_tests --gtest_filter='*Nf4*' > "$R/nf4_gpu.log" 2>&1
      echo "GPU NF4 vs bitsandbytes exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED  \]" "$R/nf4_gpu.log" | head ;;
    gen_w1)
      stage gen_w1
      timeout 150 python3 tools/make_generate_goldens.py --cases llama --new-tokens 32 > "$R/generate_w1.log" 2>&1
      echo "HF generate (W1 shape) exit $?"; tail -2 "$R/generate_w1.log"
      cp .cache/generate_goldens/golden_w1_llama.json "$R/" 2>/dev/null
      timeout 120 $B/am_tests --gtest_filter='GenerateHfGoldens.*:GenerateCuda.*' > "$R/generate_engine.log" 2>&1
      echo "engine generate vs HF exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED  \]|tokens/s" "$R/generate_engine.log" | head ;;
    goldens_cuda)
      stage goldens_cuda
      L="$R/goldens_cuda" B=$B timeout ${GOLDENS_LIMIT:-300} bash bench/goldens_cuda_check.sh ;;
    gpu_tests)
      stage gpu_tests
      L="$R/gpu_tests${GPU_TAG:+_$GPU_TAG}.log"  # GPU_TAG: a second gpu_tests run in one call keeps its own log
      timeout ${GPU_LIMIT:-240} $B/am_gpu_tests --gtest_filter="${GPU_FILTER:-*}" > "$L" 2>&1
      echo "exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|tests ran" "$L" | head -40 ;;
    micro)
      # GPU micro-benchmarks, one per ';'-separated entry: MICRO="attention_sinks;moe --persistent"
      stage micro
      IFS=';' read -ra benches <<< "${MICRO:-attention}"
      for b in "${benches[@]}"; do
        tag=$(echo "$b" | tr -c 'a-z0-9_\n' '_')
        timeout ${MICRO_LIMIT:-90} $B/am_gpu_microbench $b > "$R/micro_$tag.log" 2>&1
        echo "== am_gpu_microbench $b: exit $?"; tail -${MICRO_TAIL:-24} "$R/micro_$tag.log"
      done ;;
    mamba2)
      # issue 17: the Mamba2 GPU tests (chunked SSD and sequential scans vs the CPU) and the kernels' micro-benchmark
      # at the default Nemotron-H-like mixer (128 heads) and at nemo8's (64 heads)
      stage mamba2
      timeout ${GPU_LIMIT:-240} $B/am_gpu_tests --gtest_filter='CudaMamba2Ops.*:CudaFamilies.NemotronH*' > "$R/mamba2_tests.log" 2>&1
      echo "tests exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|Failure|outside tolerance" "$R/mamba2_tests.log" | head -30
      for h in 128 64; do
        timeout 90 $B/am_gpu_microbench mamba2 --heads $h > "$R/mamba2_bench_h$h.log" 2>&1
        echo "bench (heads $h) exit $?"; grep -A12 "selective scan" "$R/mamba2_bench_h$h.log"
      done ;;
    mamba2prof)
      # Nsight Compute on one chunked scan forward + backward at nemo8's mixer: time, occupancy and stall reasons of
      # each SSD kernel (backend/cuda/mamba2_ssd.cu)
      stage mamba2prof
      NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
      timeout ${PROF_LIMIT:-120} "$NCU" -k 'regex:chunk_state|pass_fwd|pass_bwd|scan_fwd_kernel|scan_bwd_kernel|reduce_parts' \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
        $B/am_gpu_microbench mamba2 --heads 64 --profile-scan > "$R/mamba2_ncu.txt" 2>&1
      echo "ncu exit $?"
      grep -E "^  [a-z_].*\(|Duration|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Dynamic Shared|Block Limit|Warp Cycles Per Issued|Issued Warp|No Eligible|Stall" "$R/mamba2_ncu.txt" | head -120 ;;
    fusedproj)
      # the fused q|k|v and gate|up projections (docs/fused_projections.md): GPU tests, micro-benchmark, W1 engine on / off
      stage fusedproj
      timeout 150 $B/am_gpu_tests --gtest_filter='*FusedProj*' > "$R/fusedproj_tests.log" 2>&1
      echo "tests exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|Failure" "$R/fusedproj_tests.log" | head -20
      timeout 60 $B/am_gpu_microbench fused_proj > "$R/fusedproj_bench.log" 2>&1; echo "bench exit $?"; tail -20 "$R/fusedproj_bench.log"
      for f in 0 1; do
        AM_FUSED_PROJ=$f timeout 120 $B/automodel bench bench/w1.yaml --out "$R/w1_fused$f.json" > "$R/w1_fused$f.log" 2>&1
        echo "W1 engine AM_FUSED_PROJ=$f exit $?"
        python3 -c "import json; e=json.load(open('$R/w1_fused$f.json')); print('  %.0f tok/s, step %.1f ms, peak %.2f GiB' % (e['tokens_per_s'], e['step_ms'], e['peak_mem_gib']))" 2>&1
      done ;;
    addnorm)
      # the fused residual add + RMSNorm (docs/cuda_kernels.md): GPU tests, micro-benchmark, W1 engine on / off
      stage addnorm
      if [ "${ADDNORM_TESTS:-1}" = 1 ]; then  # 0: the gpu_tests stage of the same call ran them
        timeout 200 $B/am_gpu_tests --gtest_filter='CudaAddRmsNorm.*:CudaOps.RmsNorm*:CudaOps.FrozenWeightsLinearAndRmsNorm' > "$R/addnorm_tests.log" 2>&1
        echo "tests exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|Failure" "$R/addnorm_tests.log" | head -20
      fi
      timeout 60 $B/am_gpu_microbench add_norm > "$R/addnorm_bench.log" 2>&1; echo "bench exit $?"; tail -14 "$R/addnorm_bench.log"
      for f in 0 1; do
        AM_FUSED_ADD_NORM=$f timeout 120 $B/automodel bench bench/w1.yaml --out "$R/w1_addnorm$f.json" > "$R/w1_addnorm$f.log" 2>&1
        echo "W1 engine AM_FUSED_ADD_NORM=$f exit $?"
        python3 -c "import json; e=json.load(open('$R/w1_addnorm$f.json')); print('  %.0f tok/s, step %.1f ms, peak %.2f GiB' % (e['tokens_per_s'], e['step_ms'], e['peak_mem_gib']))" 2>&1
      done ;;
    moegemm)
      # the persistent grouped GEMM for the MoE experts (docs/cuda_kernels.md): correctness (incl. the W2 shapes and
      # the no-host-sync capture), persistent vs cuBLAS grouped at W2 balanced / skewed, the W2 engine off / on
      stage moegemm
      timeout ${MOEGEMM_LIMIT:-300} $B/am_gpu_tests --gtest_filter="${MOEGEMM_FILTER:-CudaMoeGroupedGemm.*:CudaMoe.GroupedLinear*:CudaMoe.WholeBlockMatchesCpu}" > "$R/moegemm_tests.log" 2>&1
      echo "tests exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|Failure" "$R/moegemm_tests.log" | head -20
      timeout 120 $B/am_gpu_microbench moe --persistent > "$R/moegemm_bench.log" 2>&1; echo "bench exit $?"; tail -40 "$R/moegemm_bench.log"
      for v in default persistent; do
        if [ $v = persistent ]; then export AM_MOE_GEMM=persistent; else unset AM_MOE_GEMM; fi
        timeout 150 $B/automodel bench bench/w2.yaml --out "$R/w2_moegemm_$v.json" > "$R/w2_moegemm_$v.log" 2>&1
        echo "W2 engine AM_MOE_GEMM=$v exit $?"
        python3 -c "import json; e=json.load(open('$R/w2_moegemm_$v.json')); print('  %.0f tok/s, step %.1f ms, peak %.2f GiB' % (e['tokens_per_s'], e['step_ms'], e['peak_mem_gib']))" 2>&1
      done
      unset AM_MOE_GEMM ;;
    ab)
      # Engine-only A/B of opt-in switches, one bench run each (no HF: use the w1 / w2 stages for ratios):
      # AB_RUNS="w1:- w1:AM_ATTENTION=cudnn w2:AM_MOE_GEMM=persistent w1:--optimizer_in_bwd=false"
      # (WORKLOAD:ITEM[,ITEM] or WORKLOAD:-; an ITEM VAR=VALUE is exported, an ITEM --key=value is a recipe override).
      # Prints tok/s, step and peak, and the last step line's loss (a switch that breaks the numerics shows there).
      stage ab
      for run in ${AB_RUNS:-w1:-}; do
        w=${run%%:*}; envs=${run#*:}; tag=$(echo "$run" | tr -c 'A-Za-z0-9_\n' '_')
        ( args=(); [ "$envs" = - ] || { IFS=, ; for kv in $envs; do case $kv in --*) args+=("$kv") ;; *) export "$kv" ;; esac; done; unset IFS; }
          timeout ${AB_LIMIT:-120} $B/automodel bench bench/$w.yaml "${args[@]}" --out "$R/ab_$tag.json" > "$R/ab_$tag.log" 2>&1 )
        rc=$?
        python3 -c "import json; e=json.load(open('$R/ab_$tag.json')); print('%-34s exit $rc  %7.0f tok/s  step %6.1f ms (fwd+bwd %.1f, opt %.1f)  peak %6.2f GiB  last loss %.9g grad_norm %.9g' % ('$run', e['tokens_per_s'], e['step_ms'], e['fwd_bwd_ms'], e['opt_ms'], e['peak_mem_gib'], e.get('last_loss', 0), e.get('last_grad_norm', 0)))" 2>/dev/null || echo "$run exit $rc (no json)"
      done ;;
    qexport)
      # issue 16: MXFP4 (gpt_oss) / FP8 (deepseek_v3) sources loaded and saved by the engine (on the CPU), then loaded
      # by transformers: keys, values against an independent dequantisation, logits (tools/check_quantized_export.py)
      stage qexport
      timeout ${QEXPORT_LIMIT:-180} python3 tools/check_quantized_export.py $B/automodel "$R/qexport" > "$R/qexport.log" 2>&1
      echo "exit $?"; cut -c1-900 "$R/qexport.log" | tail -8 ;;
    phi3diag)
      stage phi3diag
      timeout 120 python3 tools/phi3_longrope_diag.py > "$R/phi3_diag.log" 2>&1; echo "exit $?"; tail -6 "$R/phi3_diag.log" ;;
    w1prof | w5prof)
      # Nsight Compute (the machine has ncu, not nsys): every kernel of a 3-step run of the workload (1 warm-up +
      # 2 timed), serialised, one metric (its duration); tools/ncu_kernel_summary.py turns it into a per-kernel table
      # whose sum, against the bench's own step_ms (stage w1 / w5), is the host / launch-gap share of the step.
      stage "$s"
      w=${s%prof}
      NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
      if [ -n "$NCU" ]; then
        timeout ${PROF_LIMIT:-240} "$NCU" --metrics gpu__time_duration.sum --csv --print-units base \
          $B/automodel bench bench/$w.yaml --step_scheduler.warmup_steps=1 --step_scheduler.timed_steps=2 \
          --out "$R/${s}_engine.json" > "$R/${s}_ncu.csv" 2> "$R/$s.log"
        echo "ncu exit $?"; tail -3 "$R/$s.log"
        python3 tools/ncu_kernel_summary.py "$R/${s}_ncu.csv" 3 40 > "$R/${s}_summary.txt" 2>&1
        gzip -f "$R/${s}_ncu.csv"
        head -45 "$R/${s}_summary.txt"
      else
        echo "no ncu on this machine"
      fi ;;
    sinks)
      # issue 16: flash attention with sink logits against the generic kernels (bench/gpu/bench_attention_sinks.cu)
      stage sinks
      timeout 90 $B/am_gpu_microbench attention_sinks > "$R/sinks_bench.log" 2>&1; echo "exit $?"; tail -20 "$R/sinks_bench.log" ;;
    parity_bf16)
      # issue 15: 200-step GSM8K curves, pure bf16 (nearest, stochastic) vs the fp32-master curves, HF bf16 beside
      stage parity_bf16
      OUT="$R" PARITY_BF16=1 timeout ${PARITY_LIMIT:-500} bash bench/parity_200.sh .devbuild 2>&1 | tail -25 ;;
    w5trace)
      # W5's engine step alone with AM_TRACE_TIMES=1 (ops/trace.h): GPU time per layer, LM head and optimizer.
      stage w5trace
      AM_TRACE_TIMES=1 timeout 90 $B/automodel bench bench/w5.yaml --out "$R/w5_trace.json" > "$R/w5_trace.log" 2>&1
      echo "exit $?"
      python3 -c "
import json; e = json.load(open('$R/w5_trace.json'))
print('step %.1f ms, fwd+bwd %.1f, optimizer %.1f, %.0f tok/s, peak %.2f GiB' % (e['step_ms'], e['fwd_bwd_ms'], e['opt_ms'], e['tokens_per_s'], e['peak_mem_gib']))
for k, v in sorted(e.get('gpu_time_per_step', {}).items(), key=lambda kv: -kv[1]['ms_per_step']): print('  %-32s %8.2f ms (%d per step)' % (k, v['ms_per_step'], v['calls_per_step']))
" 2>&1 | head -20 ;;
    w4)
      # BENCH.md W4 end to end (bench/w4.sh): the tokenizer and SQuAD travel packed (tools/device_bundle.sh with W4=1).
      stage w4
      OUT="$R" timeout ${BENCH_LIMIT:-540} bash bench/w4.sh .devbuild 2>&1 | tail -12 ;;
    w1 | w2 | w2bf16 | w2inbwd | w2bf16inbwd | w5 | nemo8)
      stage "$s"
      OUT="$R" timeout ${BENCH_LIMIT:-240} bash bench/run_bench.sh "$s" .devbuild 2>&1 | tail -40 ;;
    *) echo "unknown stage $s" ;;
  esac
  pack
done
echo; echo "######## done ($(date +%T))"
