#!/usr/bin/env node
// Renders the committed chat-template fixtures into golden files for tests/unit/test_chat_template.cpp.
//
//   tests/fixtures/chat_templates/templates.json      named templates (<name>.jinja + special tokens)
//   tests/fixtures/chat_templates/corpus.json         a wider corpus of real templates (inline)
//   tests/fixtures/chat_templates/conversations.jsonl conversations ({name, messages, tools?, kwargs?})
// ->
//   tests/fixtures/chat_templates/<name>.golden.jsonl every conversation, add_generation_prompt false/true
//   tests/fixtures/chat_templates/corpus.golden.jsonl CORPUS_CONVERSATIONS for every corpus template
//
// Each golden line: {"conversation", "add_generation_prompt", "text"} or {..., "error"}.
//
// Renderer: @huggingface/jinja (the npm reference renderer), with the variables transformers'
// apply_chat_template passes: the tokenizer's special tokens, messages, tools (null when absent),
// documents (null), add_generation_prompt, and the conversation's kwargs. The clock is fixed at
// FIXED_DATE (Date is replaced, so strftime_now() is stable; the C++ test sets the same date).
//
// Cross-check: unless --js-only is given, every case is also rendered by Python's jinja2 configured
// the way transformers configures it (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
// loopcontrols, {% generation %}, its tojson / raise_exception / strftime_now). transformers renders
// with jinja2, so where @huggingface/jinja disagrees with it the golden takes jinja2's output and is
// marked "reference": "jinja2" (the JS output is kept under "hf_jinja" for the record).
//
// Usage (the renderer is not a dependency of the project; install it in a scratch folder):
//   npm install --prefix /tmp/jinjaref @huggingface/jinja
//   HF_JINJA=/tmp/jinjaref/node_modules/@huggingface/jinja node tools/make_chat_template_goldens.js [--js-only]
'use strict';
const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const JS_ONLY = process.argv.includes('--js-only');
const { Template } = require(process.env.HF_JINJA || '@huggingface/jinja');
const DIR = path.join(__dirname, '..', 'tests', 'fixtures', 'chat_templates');
const FIXED_DATE = [2025, 3, 14];  // strftime_now() renders this day, 00:00:00 local time
const CORPUS_CONVERSATIONS = ['single_user', 'system_multi_turn', 'whitespace', 'unicode', 'think_in_content',
                              'tool_call_roundtrip', 'empty_content', 'not_alternating'];

const readJsonl = (p) => fs.readFileSync(p, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
const conversations = readJsonl(path.join(DIR, 'conversations.jsonl'));
const manifest = JSON.parse(fs.readFileSync(path.join(DIR, 'templates.json'), 'utf8'));
const corpus = JSON.parse(fs.readFileSync(path.join(DIR, 'corpus.json'), 'utf8'));

// ---- the template variables apply_chat_template passes
function context(specialTokens, conv, addGenerationPrompt) {
  return {
    ...specialTokens,
    messages: JSON.parse(JSON.stringify(conv.messages)),
    tools: conv.tools === undefined ? null : JSON.parse(JSON.stringify(conv.tools)),
    documents: null,
    add_generation_prompt: addGenerationPrompt,
    ...(conv.kwargs || {}),
  };
}

// ---- @huggingface/jinja with a fixed clock
const RealDate = Date;
const fixedMs = new RealDate(FIXED_DATE[0], FIXED_DATE[1] - 1, FIXED_DATE[2], 0, 0, 0).getTime();
globalThis.Date = class extends RealDate {
  constructor(...args) {
    if (args.length === 0) super(fixedMs);
    else super(...args);
  }
  static now() { return fixedMs; }
};

function renderJs(source, ctx) {
  try {
    return { text: new Template(source).render(ctx) };
  } catch (e) {
    return { error: 'Error: ' + String((e && e.message) || e) };
  }
}

// ---- jinja2 as transformers configures it (Python child process, one JSON case per line)
const PY_RENDERER = String.raw`
import datetime, json, sys
import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

class Generation(Extension):
    tags = {"generation"}
    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)
    def _render(self, caller):
        return caller()

def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

now = datetime.datetime(*[int(v) for v in sys.argv[1].split("-")])
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                    extensions=[Generation, jinja2.ext.loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = lambda fmt: now.strftime(fmt)
compiled = {}
for line in sys.stdin:
    case = json.loads(line)
    try:
        src = case["template"]
        if src not in compiled:
            compiled[src] = env.from_string(src)
        out = {"text": compiled[src].render(**case["context"])}
    except Exception as e:
        out = {"error": type(e).__name__ + ": " + str(e)}
    sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
`;

function renderPython(cases) {
  const input = cases.map((c) => JSON.stringify({ template: c.source, context: c.ctx })).join('\n') + '\n';
  const r = spawnSync('python3', ['-c', PY_RENDERER, FIXED_DATE.join('-')], {
    input, maxBuffer: 1 << 30, encoding: 'utf8',
  });
  if (r.status !== 0) {
    throw new Error('python3 + jinja2 cross-check failed (use --js-only to skip it):\n' + (r.stderr || r.error));
  }
  return r.stdout.split('\n').filter((l) => l).map((l) => JSON.parse(l));
}

// ---- build all cases, render, write
const jobs = [];  // {file, template, conv, agp, source, ctx}
for (const [name, t] of Object.entries(manifest)) {
  const source = fs.readFileSync(path.join(DIR, t.file), 'utf8');
  for (const conv of conversations)
    for (const agp of [false, true])
      jobs.push({ file: `${name}.golden.jsonl`, template: null, conv, agp, source, ctx: context(t.special_tokens, conv, agp) });
}
const corpusConvs = conversations.filter((c) => CORPUS_CONVERSATIONS.includes(c.name));
for (const [name, t] of Object.entries(corpus))
  for (const conv of corpusConvs)
    for (const agp of [false, true])
      jobs.push({ file: 'corpus.golden.jsonl', template: name, conv, agp, source: t.template, ctx: context(t.special_tokens, conv, agp) });

const py = JS_ONLY ? null : renderPython(jobs);
const files = new Map();
let divergent = 0;
jobs.forEach((job, i) => {
  const js = renderJs(job.source, job.ctx);
  const rec = {};
  if (job.template !== null) rec.template = job.template;
  rec.conversation = job.conv.name;
  rec.add_generation_prompt = job.agp;
  let out = js;
  if (py) {
    const p = py[i];
    const same = ('text' in p && p.text === js.text) || ('error' in p && 'error' in js);
    if (!same) {
      out = p;
      rec.reference = 'jinja2';
      divergent++;
    } else if ('error' in p) {
      out = p;  // keep jinja2's error text (what transformers raises)
    }
  }
  Object.assign(rec, out);
  if (rec.reference) rec.hf_jinja = js;
  if (!files.has(job.file)) files.set(job.file, []);
  files.get(job.file).push(JSON.stringify(rec));
});
for (const [file, lines] of files) fs.writeFileSync(path.join(DIR, file), lines.join('\n') + '\n');
console.log(`wrote ${files.size} golden files, ${jobs.length} cases` +
            (py ? `, ${divergent} where @huggingface/jinja differs from jinja2 (golden = jinja2)` : ' (JS only)'));
