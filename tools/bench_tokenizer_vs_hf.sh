#!/usr/bin/env bash
# Compares single-threaded (and all-core batch) encode throughput of automodel.cpp's tokenizer with HF
# tokenizers (Rust, via the Node binding @anush008/tokenizers = tokenizers 0.22.2) on the same GSM8K
# text: every question and answer of shared/datasets/gsm8k/train.jsonl, one encode per field.
# Rates are MB of UTF-8 input per second of CPU time (single-thread) or wall time (batch).
#
# Usage: tools/bench_tokenizer_vs_hf.sh [BUILD_DIR] [name ...]
#   needs: tools/fetch_tokenizers.sh done, BUILD_DIR/bin/am_microbench built, and the Node binding
#   installed in $TOKREF (default /tmp/tokref: `cd /tmp/tokref && npm install @anush008/tokenizers`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"; shift || true
NAMES=("$@"); [ ${#NAMES[@]} -eq 0 ] && NAMES=(llama3_1 qwen3 deepseek_v3 gptoss llama2)
TOKREF="${TOKREF:-/tmp/tokref}"
TEXT="${AM_BENCH_TEXT:-$ROOT/../shared/datasets/gsm8k/train.jsonl}"
[ -f "$TEXT" ] || TEXT=/work/shared/datasets/gsm8k/train.jsonl
CACHE="${AM_TOKENIZER_CACHE:-$ROOT/.cache/tokenizers}"

if [ ! -d "$TOKREF/node_modules/@anush008/tokenizers" ]; then
  echo "bench_tokenizer_vs_hf: installing @anush008/tokenizers into $TOKREF"
  mkdir -p "$TOKREF" && (cd "$TOKREF" && npm init -y >/dev/null 2>&1 && npm install --silent @anush008/tokenizers@0.6.0) || {
    echo "bench_tokenizer_vs_hf: skipping HF side: cannot install the Node binding (offline?)"; }
fi

echo "== HF tokenizers 0.22.2 (Node binding), $(basename "$TEXT")"
for n in "${NAMES[@]}"; do
  [ -f "$CACHE/$n/tokenizer.json" ] || { echo "$n: missing (run tools/fetch_tokenizers.sh)"; continue; }
  for par in false true; do
    TOKENIZERS_PARALLELISM=$par NODE_PATH="$TOKREF/node_modules" node - "$CACHE/$n/tokenizer.json" "$TEXT" "$n" "$par" <<'JS'
const fs = require('fs');
const { Tokenizer } = require('@anush008/tokenizers');
const [tjson, textPath, name, par] = process.argv.slice(2);
const texts = [];
for (const l of fs.readFileSync(textPath, 'utf8').split('\n')) {
  if (!l) continue;
  const j = JSON.parse(l);
  if (typeof j === 'string') texts.push(j);
  else for (const k of ['question', 'answer', 'text']) if (typeof j[k] === 'string') texts.push(j[k]);
}
const bytes = texts.reduce((a, s) => a + Buffer.byteLength(s), 0);
const tk = Tokenizer.fromFile(tjson);
(async () => {
  await tk.encodeBatch(texts, { addSpecialTokens: false });  // warm-up (fills the BPE word cache)
  let best = Infinity, bestWall = Infinity;
  for (let r = 0; r < 3; r++) {
    const c0 = process.cpuUsage(), t0 = process.hrtime.bigint();
    await tk.encodeBatch(texts, { addSpecialTokens: false });
    const c = process.cpuUsage(c0), wall = Number(process.hrtime.bigint() - t0) / 1e9;
    best = Math.min(best, (c.user + c.system) / 1e6);
    bestWall = Math.min(bestWall, wall);
  }
  const mb = bytes / 1e6;
  if (par === 'false') console.log(`${name}: single-thread ${(mb / best).toFixed(2)} MB/s (cpu ${best.toFixed(3)} s, wall ${bestWall.toFixed(3)} s, ${mb.toFixed(2)} MB)`);
  else console.log(`${name}: batch all cores ${(mb / bestWall).toFixed(2)} MB/s wall`);
})();
JS
  done
done

echo "== automodel.cpp ($BUILD/bin/am_microbench)"
filter="$(IFS='|'; echo "${NAMES[*]}")"
AM_SOURCE_DIR="$ROOT" AM_BENCH_TEXT="$TEXT" AM_TOKENIZER_CACHE="$CACHE" \
  "$BUILD/bin/am_microbench" --benchmark_filter="Tokenizer(Encode|EncodeBatch)/($filter)" 2>/dev/null |
  grep -E "^Tokenizer" || true
