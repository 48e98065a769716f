#!/usr/bin/env node
// Writes tests/fixtures/tokenizer/<name>.golden.jsonl from the real HF `tokenizers` (Rust, via the Node
// binding @anush008/tokenizers, which bundles tokenizers 0.22.2) for every text of
// tests/fixtures/tokenizer/texts.jsonl, following transformers' conventions:
//   ids         = encode(text, add_special_tokens=False)
//   ids_special = encode(text, add_special_tokens=True); for Llama-style tokenizer classes
//                 (LlamaTokenizer[Fast], CodeLlama, Gemma) transformers rebuilds the post-processor as
//                 bos? $A eos? from add_bos_token (default true) / add_eos_token (default false).
//   decoded / decoded_skip = decode(ids_special, skip_special_tokens=False/True), then transformers'
//                 clean_up_tokenization when tokenizer_config.json sets clean_up_tokenization_spaces.
//
// Also writes tests/fixtures/tokenizer/variants.golden.jsonl: the synthetic tokenizers of
// tests/fixtures/tokenizer/variants.json (a real tokenizer.json with components swapped, model options
// changed, added tokens patched/appended) on variant_texts.jsonl: ids (no special tokens) + decode.
//
// Usage: (npm install @anush008/tokenizers in some scratch dir, e.g. /tmp/tokref)
//   NODE_PATH=/tmp/tokref/node_modules node tools/make_tokenizer_goldens.js [name ...]
// Tokenizers are read from .cache/tokenizers/<name>/ (tools/fetch_tokenizers.sh).
'use strict';
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require('@anush008/tokenizers');

const root = path.resolve(__dirname, '..');
const cacheDir = process.env.AM_TOKENIZER_CACHE || path.join(root, '.cache', 'tokenizers');
const fixDir = path.join(root, 'tests', 'fixtures', 'tokenizer');
const names = process.argv.slice(2).length ? process.argv.slice(2)
                                           : ['llama3_1', 'qwen3', 'deepseek_v3', 'gptoss', 'llama2', 'gemma3'];
const LLAMA_LIKE = new Set(['LlamaTokenizer', 'LlamaTokenizerFast', 'CodeLlamaTokenizer',
                            'CodeLlamaTokenizerFast', 'GemmaTokenizer', 'GemmaTokenizerFast']);

function cleanUp(s) {  // transformers PreTrainedTokenizerBase.clean_up_tokenization
  const reps = [[' .', '.'], [' ?', '?'], [' !', '!'], [' ,', ','], [" ' ", "'"], [" n't", "n't"],
                [" 'm", "'m"], [" 's", "'s"], [" 've", "'ve"], [" 're", "'re"]];
  for (const [a, b] of reps) s = s.split(a).join(b);
  return s;
}
// Same transformation as apply_variant() in tests/unit/test_tokenizer.cpp.
function applyVariant(t, v) {
  for (const [k, val] of Object.entries(v.set || {})) t[k] = val;
  for (const [k, val] of Object.entries(v.model || {})) t.model[k] = val;
  for (const p of v.added_tokens_patch || [])
    for (const a of t.added_tokens) if (a.content === p.content) Object.assign(a, p);
  for (const a of v.added_tokens_append || []) t.added_tokens.push(a);
  return t;
}
function tokContent(v) { return v == null ? null : (typeof v === 'string' ? v : v.content); }

(async () => {
  const texts = fs.readFileSync(path.join(fixDir, 'texts.jsonl'), 'utf8').split('\n')
                  .filter((l) => l.length).map((l) => JSON.parse(l));
  for (const name of names) {
    const dir = path.join(cacheDir, name);
    if (!fs.existsSync(path.join(dir, 'tokenizer.json'))) {
      console.error(`skipping ${name}: ${dir} missing (run tools/fetch_tokenizers.sh)`);
      continue;
    }
    const tk = Tokenizer.fromFile(path.join(dir, 'tokenizer.json'));
    const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer_config.json'), 'utf8'));
    let prefix = null, suffix = null;
    if (LLAMA_LIKE.has(cfg.tokenizer_class)) {
      const addBos = cfg.add_bos_token === undefined ? true : cfg.add_bos_token;
      const addEos = cfg.add_eos_token === undefined ? false : cfg.add_eos_token;
      prefix = []; suffix = [];
      if (addBos && tokContent(cfg.bos_token) != null) prefix.push(tk.tokenToId(tokContent(cfg.bos_token)));
      if (addEos && tokContent(cfg.eos_token) != null) suffix.push(tk.tokenToId(tokContent(cfg.eos_token)));
    }
    const cleanup = cfg.clean_up_tokenization_spaces === true;
    const out = [JSON.stringify({ meta: { tokenizer: name, reference: '@anush008/tokenizers 0.6.0 (tokenizers 0.22.2)',
                                          add_special: prefix ? 'llama-style bos/eos' : 'post_processor',
                                          clean_up_tokenization_spaces: cleanup } })];
    for (let i = 0; i < texts.length; i++) {
      const t = texts[i];
      const ids = (await tk.encode(t, null, { addSpecialTokens: false })).getIds();
      const idsSpecial = prefix ? prefix.concat(ids, suffix)
                                : (await tk.encode(t, null, { addSpecialTokens: true })).getIds();
      let dec = await tk.decode(idsSpecial, false);
      let decSkip = await tk.decode(idsSpecial, true);
      if (cleanup) { dec = cleanUp(dec); decSkip = cleanUp(decSkip); }
      out.push(JSON.stringify({ i, ids, ids_special: idsSpecial, decoded: dec, decoded_skip: decSkip }));
    }
    fs.writeFileSync(path.join(fixDir, `${name}.golden.jsonl`), out.join('\n') + '\n');
    console.log(`${name}: ${texts.length} texts`);
  }
  if (process.argv.slice(2).length) return;
  // ---- variants ----
  const variants = JSON.parse(fs.readFileSync(path.join(fixDir, 'variants.json'), 'utf8'));
  const vtexts = fs.readFileSync(path.join(fixDir, 'variant_texts.jsonl'), 'utf8').split('\n')
                   .filter((l) => l.length).map((l) => JSON.parse(l));
  const vout = [];
  for (const v of variants) {
    const basePath = path.join(cacheDir, v.base, 'tokenizer.json');
    if (!fs.existsSync(basePath)) { console.error(`skipping variant ${v.name}: ${basePath} missing`); return; }
    const t = applyVariant(JSON.parse(fs.readFileSync(basePath, 'utf8')), v);
    const tk = Tokenizer.fromString(JSON.stringify(t));
    for (let i = 0; i < vtexts.length; i++) {
      const ids = (await tk.encode(vtexts[i], null, { addSpecialTokens: false })).getIds();
      vout.push(JSON.stringify({ variant: v.name, i, ids, decoded: await tk.decode(ids, false) }));
    }
  }
  fs.writeFileSync(path.join(fixDir, 'variants.golden.jsonl'), vout.join('\n') + '\n');
  console.log(`variants: ${variants.length} x ${vtexts.length} texts`);
})().catch((e) => { console.error(e); process.exit(1); });
