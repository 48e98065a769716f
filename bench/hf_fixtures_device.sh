#!/usr/bin/env bash
# HF-side fixtures on the GPU machine, one call, no engine binary needed (torch/transformers/peft are there):
#   1. fp32 HF goldens for the families named in $CASES (tools/make_hf_goldens.py), written into
#      tests/fixtures/golden/ with index.json merged (the tool rewrites it with only the cases it ran);
#   2. HF generate(do_sample=False) goldens for every tiny golden case (tools/make_generate_goldens.py --no-w1);
#   3. bf16 goldens for $BF16_CASES (tools/make_hf_bf16_goldens.py);
#   4. TensorBoard reading our event files, if TB_CHECK=DIR holds DIR/tb (events) and DIR/run (training.jsonl);
#   5. NF4 goldens from bitsandbytes' CUDA kernels, if BNB_SRC=DIR is a bitsandbytes source tree (built here).
# Everything that changed comes back as $OUT/fixtures.tgz (the tool returns at most 8 files); logs in $OUT.
#   bash bench/hf_fixtures_device.sh
set -uo pipefail
O=${OUT:-/tmp/hf_fixtures}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
CASES=${CASES:-gemma3_text,gemma2,phi3,gpt_oss,deepseek_v3,nemotron_h}
BF16_CASES=${BF16_CASES:-gemma3_text}
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee "$O/versions.txt"
# The tools rewrite index.json with only the cases they ran: put the earlier cases back (new ones last).
merge_index() {
  python3 - "$1" "$2" <<'PY'
import json, sys
before, path = sys.argv[1], sys.argv[2]
old, new = json.load(open(before)), json.load(open(path))
cases = old["cases"] + [c for c in new["cases"] if c not in old["cases"]]
merged = dict(old, **{k: v for k, v in new.items() if k != "cases"}, cases=cases)
with open(path, "w") as f:
    json.dump(merged, f, indent=2)
    f.write("\n")
print(path, "cases:", " ".join(cases))
PY
}
cp tests/fixtures/golden/index.json /tmp/golden_index_before.json
touch /tmp/hf_fixtures_start; sleep 1

echo "== 1. HF fp32 goldens: $CASES"
timeout 240 python3 tools/make_hf_goldens.py --cases "$CASES" > "$O/hf_goldens.log" 2>&1
echo "exit $?"; grep -E "^\[|case|loss|Error|error" "$O/hf_goldens.log" | tail -15
merge_index /tmp/golden_index_before.json tests/fixtures/golden/index.json

echo "== 2. HF generate goldens (tiny cases)"
timeout 120 python3 tools/make_generate_goldens.py --no-w1 --new-tokens 32 > "$O/generate_goldens.log" 2>&1
echo "exit $?"; tail -3 "$O/generate_goldens.log"

echo "== 3. bf16 goldens: $BF16_CASES"
cp tests/fixtures/golden_bf16/index.json /tmp/bf16_index_before.json 2>/dev/null
timeout 120 python3 tools/make_hf_bf16_goldens.py --cases "$BF16_CASES" > "$O/bf16_goldens.log" 2>&1
echo "exit $?"; tail -3 "$O/bf16_goldens.log"
merge_index /tmp/bf16_index_before.json tests/fixtures/golden_bf16/index.json

if [ -n "${TB_CHECK:-}" ]; then
  echo "== 4. TensorBoard reads our event files"
  timeout 60 python3 tools/tb_readback_check.py "$TB_CHECK/tb" "$TB_CHECK/run" 2>&1 | tee "$O/tb_readback.log"
fi

if [ -n "${BNB_SRC:-}" ]; then
  echo "== 5. NF4 goldens from bitsandbytes (built from $BNB_SRC for sm_90)"
  ( cmake -S "$BNB_SRC" -B /tmp/bnb_build -DCOMPUTE_BACKEND=cuda -DCOMPUTE_CAPABILITY=90 -DCMAKE_BUILD_TYPE=Release &&
    cmake --build /tmp/bnb_build -j16 ) > "$O/bnb_build.log" 2>&1
  echo "bitsandbytes build exit $?"; ls "$BNB_SRC"/bitsandbytes/*.so 2>/dev/null
  PYTHONPATH="$BNB_SRC" timeout 90 python3 tools/make_nf4_golden.py > "$O/nf4_golden.log" 2>&1
  echo "exit $?"; tail -3 "$O/nf4_golden.log"
fi

find tests/fixtures -type f -newer /tmp/hf_fixtures_start > /tmp/changed.txt
tar czf "$O/fixtures.tgz" -T /tmp/changed.txt && echo "fixtures.tgz: $(wc -l < /tmp/changed.txt) files, $(du -h "$O/fixtures.tgz" | cut -f1)"
