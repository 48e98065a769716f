#!/usr/bin/env bash
# Launching several workers through the real binary (SPEC §1 "Launching on several GPUs or machines"):
# --nproc-per-node on CPU (through mpirun), the usage errors, a direct mpirun launch, and the supervisor
# stopping the whole job when one worker is killed. Checks exit codes, messages and processes only: no
# numbers. Every wait is bounded, so a broken supervisor fails the test instead of hanging it.
#   tests/cli/run_dist_cli_tests.sh build/bin/automodel
set -uo pipefail
BIN=$(realpath "${1:?usage: run_dist_cli_tests.sh path/to/automodel}")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FIX="$ROOT/tests/fixtures/golden/llama"
T=$(mktemp -d)
export AM_CACHE_DIR="$T/am_cache"  # tokenised datasets are cached here, never in ~/.cache (docs/datasets.md)
BG_PID=
cleanup() {
  [ -n "$BG_PID" ] && kill -9 "$BG_PID" 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT
pass=0 fail=0

ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; [ -n "${2:-}" ] && sed 's/^/     /' <<<"$2" | tail -8; }

# expect NAME EXPECTED_CODE REGEX -- command...   (each command gets 300 s at most)
expect() {
  local name=$1 code=$2 re=$3
  shift 4
  local out rc
  out=$(timeout -k 5 300 "$@" 2>&1)
  rc=$?
  if [ "$rc" -eq "$code" ] && grep -Eq -- "$re" <<<"$out" && ! grep -Eq 'terminate called|Segmentation|Aborted|core dumped' <<<"$out"; then
    ok "$name (exit $rc): $(grep -E -- "$re" <<<"$out" | head -1)"
  else
    bad "$name: exit $rc (want $code), output:" "$out"
  fi
  LAST_OUT=$out
}

MPIRUN=(mpirun -np 2 --oversubscribe --bind-to none --mca btl self,vader --mca btl_vader_single_copy_mechanism none)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)

cp -r "$FIX" "$T/case"
R="$T/case/recipe.yaml"

# ---- two CPU workers under our supervisor: to the end, one step line, one training.jsonl ----
expect "nproc-per-node 2 on cpu" 0 "step 4 \| epoch 0" -- "$BIN" finetune "$R" --nproc-per-node 2 --device=cpu \
  --checkpoint.checkpoint_dir="$T/ck2"
n=$(grep -Ec "^step 4 \|" <<<"$LAST_OUT")
[ "$n" = 1 ] && ok "step line printed once (rank 0 only)" || bad "step 4 printed $n times (want 1)" "$LAST_OUT"
n=$(wc -l <"$T/ck2/training.jsonl" 2>/dev/null || echo missing)
[ "$n" = 4 ] && ok "training.jsonl has 4 lines" || bad "training.jsonl: $n lines (want 4)"
expect "--nproc-per-node=2 form" 0 "step 4 \| epoch 0" -- "$BIN" "$R" --nproc-per-node=2 --device=cpu \
  --checkpoint.checkpoint_dir="$T/ck2b"
expect "--nproc_per_node form (eval)" 0 "val_loss" -- "$BIN" eval "$R" --nproc_per_node 2 --device=cpu \
  --validation_dataset._target_=tokenized_jsonl --validation_dataset.path_or_dataset=data.jsonl

# ---- LoRA: 2 ranks (fsdp2 shards the LoRA pairs, the frozen base is replicated) = 1 rank = HF PEFT ----
LG="$ROOT/tests/fixtures/lora_golden"
for c in llama qwen3_moe; do
  expect "lora $c on 2 cpu ranks" 0 "step 4 \| epoch 0" -- "$BIN" finetune "$LG/$c/recipe.yaml" --nproc-per-node 2 --device=cpu \
    --checkpoint.checkpoint_dir="$T/lora2_$c"
  expect "lora $c 2 ranks = PEFT golden" 0 "^same ok" -- python3 - "$LG/$c/expected.json" "$T/lora2_$c" <<'PY'
import json, os, sys, struct
exp = json.load(open(sys.argv[1]))["steps"]
got = [json.loads(l) for l in open(os.path.join(sys.argv[2], "training.jsonl"))]
assert len(got) == len(exp)
for e, g in zip(exp, got):
    assert abs(g["loss"] - e["loss"]) <= 1e-4 * abs(e["loss"]), (g["loss"], e["loss"])
    assert abs(g["grad_norm"] - e["grad_norm"]) <= 1e-3 * abs(e["grad_norm"]), (g["grad_norm"], e["grad_norm"])
assert os.path.exists(os.path.join(sys.argv[2], "LATEST/model/adapter_model.safetensors"))
print("same ok")
PY
done

# ---- usage errors: exit 2, the message names the cause ----
expect "nproc-per-node 0" 2 "nproc-per-node 0: must be >= 1" -- "$BIN" finetune "$R" --nproc-per-node 0
expect "nproc-per-node not a number" 2 "nproc-per-node 'two': expected an integer" -- "$BIN" finetune "$R" --nproc-per-node two
expect "nproc-per-node 2 on cuda without GPU" 2 "GPU" -- "$BIN" finetune "$R" --nproc-per-node 2 --device=cuda
expect "torchrun env without MASTER_ADDR" 2 "MASTER_ADDR" -- env RANK=0 WORLD_SIZE=2 MASTER_PORT=29500 "$BIN" finetune "$R"
expect "bad RANK" 2 "RANK='x'" -- env RANK=x WORLD_SIZE=2 "$BIN" finetune "$R"
expect "no mpirun on PATH" 2 "mpirun.*(make setup|Open MPI)" -- env PATH=/nonexistent "$BIN" finetune "$R" \
  --nproc-per-node 2 --device=cpu

# ---- launched by mpirun directly: the workers find their ranks in OMPI_COMM_WORLD_* ----
# bad distributed: settings stop before any worker starts, exit 2, naming the key
MOE="$ROOT/tests/fixtures/golden/qwen3_moe/recipe.yaml"
expect "ep_size not dividing the world" 2 "distributed.ep_size.*3 does not divide the world size 2" -- "$BIN" finetune "$MOE" \
  --nproc-per-node 2 --device=cpu --distributed.ep_size=3 --checkpoint.checkpoint_dir="$T/ck_ep3"
expect "ep_size not dividing the experts" 2 "distributed.ep_size.*3 does not divide the 8 experts" -- "$BIN" finetune "$MOE" \
  --nproc-per-node 3 --device=cpu --distributed.ep_size=3 --step_scheduler.global_batch_size=6 --checkpoint.checkpoint_dir="$T/ck_ep3e"
expect "ep_size on a dense model" 2 "distributed.ep_size.*has no experts" -- "$BIN" finetune "$R" \
  --nproc-per-node 2 --device=cpu --distributed.ep_size=2 --checkpoint.checkpoint_dir="$T/ck_epd"
expect "unknown strategy" 2 "distributed.strategy.*expected fsdp2 or ddp" -- "$BIN" finetune "$R" \
  --nproc-per-node 2 --device=cpu --distributed.strategy=zero3 --checkpoint.checkpoint_dir="$T/ck_z3"
# tensor parallelism asked (an AutoModel recipe for more GPUs): one warning line, then data parallel over both ranks
expect "tensor parallelism asked: warned, runs data parallel" 0 "distributed.tp_size'? \(2\): tensor parallelism is not supported; the GPUs run data parallel" -- \
  "$BIN" finetune "$R" --nproc-per-node 2 --device=cpu --distributed.tp_size=2 --distributed.dp_size=1 --checkpoint.checkpoint_dir="$T/ck_tp"
expect "batch not split over ranks" 2 "local_batch_size x data-parallel ranks" -- "$BIN" finetune "$R" \
  --nproc-per-node 2 --device=cpu --step_scheduler.global_batch_size=6 --checkpoint.checkpoint_dir="$T/ck_gbs"
# expert parallelism through the launcher, MoE golden numbers at world 2 (ep_size 2)
expect "moe ep_size 2 through --nproc-per-node" 0 "step 4 \| epoch 0 \| loss 5\.71" -- "$BIN" finetune "$MOE" \
  --nproc-per-node 2 --device=cpu --distributed.ep_size=2 --checkpoint.checkpoint_dir="$T/ck_ep2"
# every HF golden family (and ref_torch family) through the real launcher path at world 2 (fsdp2; ddp for the dense ones; ep_size 2
# for the MoE ones): per-step loss within 1e-4 and grad norm within 1e-3 of transformers (expected.json)
golden_check() {  # NAME CKPT_DIR CASE_DIR
  python3 - "$2/training.jsonl" "$3/expected.json" <<'PY'
import json, sys
got = [json.loads(l) for l in open(sys.argv[1])]
exp = json.load(open(sys.argv[2]))["steps"]
assert len(got) == len(exp), f"{len(got)} steps logged, expected {len(exp)}"
worst_l = max(abs(g["loss"] - e["loss"]) / e["loss"] for g, e in zip(got, exp))
worst_g = max(abs(g["grad_norm"] - e["grad_norm"]) / e["grad_norm"] for g, e in zip(got, exp))
assert all(g["num_label_tokens"] == e["num_label_tokens"] for g, e in zip(got, exp)), "label counts differ"
assert all(g["world_size"] == 2 for g in got), "not a world-2 run"
print(f"loss rel {worst_l:.2e}, grad_norm rel {worst_g:.2e}")
sys.exit(0 if worst_l < 1e-4 and worst_g < 1e-3 else 1)
PY
}
if command -v python3 >/dev/null; then
  # (and the families checked against the independent torch reference until their HF goldens exist)
  for case_dir in "$ROOT"/tests/fixtures/golden/*/ "$ROOT"/tests/fixtures/ref_torch/*/; do
    c=$(basename "$case_dir")
    [[ "$case_dir" == */ref_torch/* ]] && c="ref_torch_$c"
    [ -f "$case_dir/expected.json" ] || continue
    modes="fsdp2 ddp"
    # MoE: expert parallelism (not for nemotron_h and gpt_oss, which refuse it: checked below)
    grep -q experts "$case_dir/model/config.json" && ! grep -qE '"(nemotron_h|gpt_oss)"' "$case_dir/model/config.json" &&
      modes="fsdp2 ep2"
    for m in $modes; do
      args=(--distributed.strategy=fsdp2)
      [ "$m" = ddp ] && args=(--distributed.strategy=ddp)
      [ "$m" = ep2 ] && args=(--distributed.ep_size=2)
      ck="$T/golden_${c}_$m"
      "$BIN" finetune "$case_dir/recipe.yaml" --nproc-per-node 2 --device=cpu "${args[@]}" \
        --checkpoint.checkpoint_dir="$ck" > "$ck.log" 2>&1
      if out=$(golden_check "$c" "$ck" "$case_dir" 2>&1); then ok "golden $c $m at world 2: $out"
      else bad "golden $c $m at world 2" "$out
$(tail -3 "$ck.log")"; fi
    done
  done
else
  echo "skip golden families at world 2 through the launcher: no python3 to read expected.json"
fi

NH="$ROOT/tests/fixtures/ref_torch/nemotron_h/recipe.yaml"
expect "nemotron_h refuses expert parallelism" 2 "expert parallelism is not implemented for nemotron_h" -- "$BIN" finetune "$NH" \
  --nproc-per-node 2 --device=cpu --distributed.ep_size=2 --checkpoint.checkpoint_dir="$T/ck_nh_ep"
GO="$ROOT/tests/fixtures/golden/gpt_oss/recipe.yaml"
expect "gpt_oss refuses expert parallelism" 2 "expert parallelism is not implemented for gpt_oss" -- "$BIN" finetune "$GO" \
  --nproc-per-node 2 --device=cpu --distributed.ep_size=2 --checkpoint.checkpoint_dir="$T/ck_go_ep"

expect "mpirun -np 2 directly" 0 "step 4 \| epoch 0" -- "${MPIRUN[@]}" "$BIN" finetune "$R" \
  --checkpoint.checkpoint_dir="$T/ck_mpi"

# ---- a worker killed: the supervisor stops the job, names the rank, leaves nothing behind ----
S="$T/status"
LONG=(--step_scheduler.max_steps=1000000 --step_scheduler.num_epochs=1000000 --checkpoint.enabled=false
      --checkpoint.checkpoint_dir="$T/ck_kill")
# subreaper.py: orphans come to it and stay unreaped, as under a container's PID 1 that never reaps (CI).
REAPER=("$ROOT/tests/cli/subreaper.py")
command -v python3 >/dev/null || REAPER=()
AUTOMODEL_STATUS_DIR="$S" "${REAPER[@]}" timeout -k 5 120 "$BIN" finetune "$R" --nproc-per-node 2 --device=cpu "${LONG[@]}" \
  >"$T/kill.log" 2>&1 &
BG_PID=$!
for _ in $(seq 1 600); do  # both workers registered (60 s at most)
  [ -s "$S/rank_0.pid" ] && [ -s "$S/rank_1.pid" ] && break
  sleep 0.1
done
if [ -s "$S/rank_0.pid" ] && [ -s "$S/rank_1.pid" ]; then
  P0=$(cat "$S/rank_0.pid") P1=$(cat "$S/rank_1.pid")
  sleep 1  # let them get into the training loop
  kill -9 "$P1"
  t0=$(date +%s%N)
  for _ in $(seq 1 100); do kill -0 "$BG_PID" 2>/dev/null || break; sleep 0.1; done  # 10 s
  if kill -0 "$BG_PID" 2>/dev/null; then
    bad "supervisor still running 10 s after rank 1 was killed" "$(cat "$T/kill.log")"
    kill -9 "$BG_PID"
  fi
  wait "$BG_PID"
  rc=$?
  BG_PID=
  dt=$(( ($(date +%s%N) - t0) / 1000000 ))
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] && grep -Eq "error: worker rank 1 \(pid $P1\)" "$T/kill.log"; then
    ok "killed rank 1: supervisor exit $rc after ${dt} ms: $(grep -E 'error: worker rank 1' "$T/kill.log" | head -1)"
  else
    bad "killed rank 1: supervisor exit $rc, output:" "$(cat "$T/kill.log")"
  fi
  sleep 0.5
  left=$(for p in "$P0" "$P1"; do kill -0 "$p" 2>/dev/null && echo "$p"; done; pgrep -f "$T/case/recipe.yaml" || true)
  if [ -z "$left" ] && ! grep -q "^left behind:" "$T/kill.log"; then ok "no worker left behind (zombies included)"
  else bad "processes left behind: $left" "$(grep '^left behind:' "$T/kill.log"; [ -n "$left" ] && ps -o pid,ppid,stat,cmd -p $left)"; fi
  # the left-overs would spoil the next tests: clean them up whatever happened
  [ -n "$left" ] && kill -9 $left 2>/dev/null
else
  bad "workers did not register within 60 s" "$(cat "$T/kill.log")"
fi

# ---- SIGTERM to the supervisor is forwarded: every worker stops, and so does the job ----
# -k 30: GNU timeout forwards our SIGTERM and arms its kill-after clock at once; 5 s was short enough on a loaded
# 2-core CI machine to SIGKILL the supervisor mid-stop, orphaning mpirun and the workers (zombies under the
# non-reaping subreaper). The 15 s "job stopped" check below is what bounds the stop.
AUTOMODEL_STATUS_DIR="$S" "${REAPER[@]}" timeout -k 30 120 "$BIN" finetune "$R" --nproc-per-node 2 --device=cpu "${LONG[@]}" \
  >"$T/term.log" 2>&1 &
BG_PID=$!
for _ in $(seq 1 600); do [ -s "$S/rank_0.pid" ] && [ -s "$S/rank_1.pid" ] && break; sleep 0.1; done
sleep 1
kill -TERM "$BG_PID"
t0=$(date +%s%N)
for _ in $(seq 1 150); do kill -0 "$BG_PID" 2>/dev/null || break; sleep 0.1; done  # 15 s
if kill -0 "$BG_PID" 2>/dev/null; then
  bad "supervisor still running 15 s after SIGTERM" "$(cat "$T/term.log")"
  kill -9 "$BG_PID"
else
  ok "SIGTERM: job stopped after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
fi
wait "$BG_PID" 2>/dev/null
BG_PID=
left=$(pgrep -f "$T/case/recipe.yaml" || true)
if [ -z "$left" ] && ! grep -q "^left behind:" "$T/term.log"; then ok "SIGTERM: no worker left behind (zombies included)"
else bad "SIGTERM: processes left behind: $left" "$(grep '^left behind:' "$T/term.log")"; [ -n "$left" ] && kill -9 $left; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
