#!/usr/bin/env python3
"""HF generate(do_sample=False) token goldens for `automodel generate` (tests/unit/test_generate.cpp).

Runs where PyTorch and transformers are installed (the GPU machine); everything runs on the CPU in float32,
as the engine's CPU reference does, so the two sides compare the same arithmetic up to summation order.

  tiny cases: every model of tests/fixtures/golden/<case>/model (random tiny HF models, vocab 300) ->
              tests/fixtures/generate/golden_<case>.json (a few KB each; commit them)
  w1_llama:   a random Llama with the W1 shape (bench/w1_config.json: Llama-3.2-1B), seeded, saved in bf16 to
              .cache/generate_goldens/w1_llama/model/ (2.5 GB, git-ignored) and run in fp32 from those bf16
              weights -> .cache/generate_goldens/golden_w1_llama.json

Each JSON: {"model_dir", "prompt_ids", "expected_ids" (the new tokens, an EOS that stopped HF included),
"eos_token_ids", "top2_margins" (HF's logit gap between its first and second choice at every step: random
models have near-ties, where fp32 summation order alone can flip the argmax), "max_new_tokens",
"transformers", "torch"}.

Usage:  python3 tools/make_generate_goldens.py [--cases llama,mistral,...] [--no-w1] [--new-tokens 32]
"""

import argparse
import json
import os
import random
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU fp32: the goldens must not depend on a GPU

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def greedy(model, prompt_ids, new_tokens, eos):
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=eos if eos else None,
            pad_token_id=eos[0] if eos else 0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, ids.shape[1]:].tolist()
    margins = []
    for step in out.logits:  # raw logits [1, V] per step
        top = torch.topk(step[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    return new, margins


def eos_ids(model):
    e = model.generation_config.eos_token_id
    if e is None:
        e = model.config.eos_token_id
    if e is None:
        return []
    return [int(x) for x in (e if isinstance(e, (list, tuple)) else [e])]


def write(path, model_dir, prompt, new, margins, eos, n):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rel = os.path.relpath(model_dir, ROOT)
    with open(path, "w") as f:
        json.dump(
            {
                "model_dir": rel,
                "prompt_ids": prompt,
                "expected_ids": new,
                "eos_token_ids": eos,
                "top2_margins": margins,
                "max_new_tokens": n,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            f,
            indent=1,
        )
        f.write("\n")
    print(f"{path}: {len(new)} tokens, smallest top-2 gap {min(margins) if margins else 0:.3g}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="", help="comma-separated golden cases (default: all of index.json)")
    ap.add_argument("--no-w1", action="store_true", help="skip the W1-shaped Llama (2.5 GB on disk)")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.backends.cuda.matmul.allow_tf32 = False

    gold = os.path.join(ROOT, "tests/fixtures/golden")
    cases = a.cases.split(",") if a.cases else json.load(open(os.path.join(gold, "index.json")))["cases"]
    for c in cases:
        model_dir = os.path.join(gold, c, "model")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        rng = random.Random(f"generate-{c}")
        prompt = [rng.randrange(3, model.config.vocab_size) for _ in range(8)]
        eos = eos_ids(model)
        new, margins = greedy(model, prompt, a.new_tokens, eos)
        write(os.path.join(ROOT, "tests/fixtures/generate", f"golden_{c}.json"), model_dir, prompt, new, margins, eos,
              a.new_tokens)

    if not a.no_w1:
        out = os.path.join(ROOT, ".cache/generate_goldens")
        model_dir = os.path.join(out, "w1_llama/model")
        cfg = AutoConfig.from_pretrained(os.path.join(ROOT, "bench/w1_config.json"))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        # Saved in bf16 (W1's dtype) and run in fp32 from exactly those weights: the engine loads the bf16
        # file into fp32 on the CPU, so both sides hold the same values.
        model = model.to(torch.bfloat16)
        model.save_pretrained(model_dir, safe_serialization=True)
        model = model.float()
        rng = random.Random("generate-w1")
        prompt = [cfg.bos_token_id] + [rng.randrange(1000, 120000) for _ in range(15)]
        eos = eos_ids(model)
        new, margins = greedy(model, prompt, a.new_tokens, eos)
        write(os.path.join(out, "golden_w1_llama.json"), model_dir, prompt, new, margins, eos, a.new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
