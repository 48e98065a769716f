#!/usr/bin/env bash
# One device call for the distributed path (issues "Distributed training" item 8 and "Multi-GPU runs").
#   bash bench/dist_device_check.sh        (expects .devpack/bundle.tar.xz from tools/device_bundle.sh)
# 1. World 1 on one GPU: every golden through the plain path and through the NCCL data-parallel path
#    (AUTOMODEL_FORCE_DIST=1: fsdp2 buckets, NCCL communicator of one rank); the losses must agree.
# 2. With 2+ GPUs: the goldens at --nproc-per-node 2 (fsdp2, ddp, and ep_size 2 for MoE) against world 1 on
#    CUDA, and a killed rank stopping the job within 10 s.
# Prints a table last; logs under $OUT.
set -uo pipefail
OUTDIR=${OUT:-/tmp/distcheck}
mkdir -p .devbuild "$OUTDIR" && tar xJf .devpack/bundle.tar.xz -C .devbuild
source tools/device_env.sh
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off (KINDS.md); the supervisor also sets it per worker
B=.devbuild/bin
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
CASES=$(python3 -c "import json;print(' '.join(json.load(open('tests/fixtures/golden/index.json'))['cases']))")
run_case() {  # NAME CASE EXTRA_ARGS...
  local name=$1 c=$2; shift 2
  rm -rf "/tmp/dc_$name"
  timeout 120 $B/automodel finetune tests/fixtures/golden/$c/recipe.yaml --device=cuda \
    --checkpoint.checkpoint_dir=/tmp/dc_$name "$@" > "$OUTDIR/$name.log" 2>&1 || echo "$name FAILED: $(tail -2 "$OUTDIR/$name.log")"
}
compare() {  # REF OTHER CASE
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
ref, oth, c = sys.argv[1:]
try:
    a = [json.loads(l) for l in open(f"/tmp/dc_{ref}/training.jsonl")]
    b = [json.loads(l) for l in open(f"/tmp/dc_{oth}/training.jsonl")]
except OSError as e:
    print(f"{oth:28s} no result ({e})"); sys.exit()
dl = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b))
dg = max(abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] for x, y in zip(a, b))
print(f"{oth:28s} vs {ref:20s} steps {len(b)}/{len(a)}  max loss diff {100*dl:.4f}%  max grad-norm diff {100*dg:.4f}%")
PY
}
echo "== world 1: plain vs NCCL data-parallel path"
for c in $CASES; do
  run_case "${c}_w1" "$c"
  AUTOMODEL_FORCE_DIST=1 run_case "${c}_w1nccl" "$c"
  compare "${c}_w1" "${c}_w1nccl" "$c" | tee -a "$OUTDIR/table.txt"
done
if [ "$NGPU" -ge 2 ]; then
  echo "== world 2 ($NGPU GPUs visible)"
  for c in $CASES; do
    for s in fsdp2 ddp; do
      run_case "${c}_w2$s" "$c" --nproc-per-node 2 --distributed.strategy=$s
      compare "${c}_w1" "${c}_w2$s" "$c" | tee -a "$OUTDIR/table.txt"
    done
    if grep -q experts tests/fixtures/golden/$c/model/config.json; then
      run_case "${c}_w2ep2" "$c" --nproc-per-node 2 --distributed.ep_size=2
      compare "${c}_w1" "${c}_w2ep2" "$c" | tee -a "$OUTDIR/table.txt"
    fi
  done
  echo "== kill one rank"
  $B/automodel finetune tests/fixtures/golden/llama/recipe.yaml --device=cuda --nproc-per-node 2 \
    --step_scheduler.max_steps=100000 --step_scheduler.num_epochs=100000 --checkpoint.enabled=false \
    --checkpoint.checkpoint_dir=/tmp/dc_kill > "$OUTDIR/kill.log" 2>&1 &
  sup=$!
  sleep 20
  victim=$(pgrep -f "automodel finetune" | grep -v "^$sup\$" | tail -1)
  t0=$(date +%s.%N); kill -9 "$victim"; wait $sup; rc=$?; t1=$(date +%s.%N)
  echo "killed pid $victim: supervisor exit $rc after $(echo "$t1 - $t0" | bc) s; left: $(pgrep -fc 'automodel finetune')" | tee -a "$OUTDIR/table.txt"
else
  echo "== world 2 skipped: $NGPU GPU(s) visible"
fi
echo "== table"; cat "$OUTDIR/table.txt"
