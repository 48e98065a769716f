#!/usr/bin/env python3
"""Where does HF's phi3 generate leave ours? (docs/generate.md: the tiny phi3 golden diverges at input position 32,
the first past original_max_position_embeddings.) Teacher-forces HF's own greedy tokens and prints, per input
position, the logit of HF's token minus the best other one under three HF runs:
  cached     step by step with the default cache (what generate does)
  full       one forward over the whole sequence, no cache (long factors everywhere past 32)
  cached_ls  step by step, with long_factor := short_factor in the config (no LongRoPE switch at all)
and HF's argmax in each. Run on the GPU machine (transformers there):  python3 tools/phi3_longrope_diag.py"""
import copy
import json
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
g = json.load(open(os.path.join(ROOT, "tests/fixtures/generate/golden_phi3.json")))
mdir = os.path.join(ROOT, g["model_dir"])
seq = g["prompt_ids"] + g["expected_ids"]
P = len(g["prompt_ids"])


def load(mod=None):
    cfg = AutoConfig.from_pretrained(mdir)
    if mod:
        mod(cfg)
    m = AutoModelForCausalLM.from_pretrained(mdir, config=cfg, torch_dtype=torch.float32).eval()
    return m


def cached(m):
    out = []
    with torch.no_grad():
        r = m(torch.tensor([seq[:P]]), use_cache=True)
        out.append(r.logits[0, -1])
        pkv = r.past_key_values
        for i in range(P, len(seq) - 1):
            r = m(torch.tensor([[seq[i]]]), past_key_values=pkv, use_cache=True,
                  position_ids=torch.tensor([[i]]), cache_position=torch.tensor([i]))
            pkv = r.past_key_values
            out.append(r.logits[0, -1])
    return out


def full(m):
    with torch.no_grad():
        lg = m(torch.tensor([seq[:-1]]), use_cache=False).logits[0]
    return [lg[i] for i in range(P - 1, len(seq) - 1)]


def ls(cfg):
    rp = cfg.rope_parameters
    rp["long_factor"] = list(rp["short_factor"])


runs = {"cached": cached(load()), "full": full(load()), "cached_ls": cached(load(ls))}
print("config rope_parameters:", AutoConfig.from_pretrained(mdir).rope_parameters)
print(f"{'in_pos':>6} {'hf_tok':>6} " + " ".join(f"{k:>22}" for k in runs))
for s in range(len(g["expected_ids"])):
    want = g["expected_ids"][s]
    cells = []
    for k, v in runs.items():
        lg = v[s].float()
        am = int(lg.argmax())
        other = lg.clone()
        other[want] = -1e30
        cells.append(f"{am:4d} {float(lg[want] - other.max()):+.6f} {float(lg[want]):+.4f}")
    print(f"{P + s - 1:6d} {want:6d} " + " ".join(f"{c:>22}" for c in cells))

# HF generate itself against its own teacher-forced forward: the first step where generate's logits leave the
# forward's, for the golden prompt and a shorter one (does the step move with the prompt length, i.e. is it the
# sliding window (24) counted from the prompt, or position 32?), with and without the cache.
m = load()
print("generate_config:", m.generation_config.to_dict().get("cache_implementation"), "sliding_window", m.config.sliding_window)
for plen in (8, 4):
    for use_cache in (True, False):
        ids = torch.tensor([g["prompt_ids"][:plen]])
        with torch.no_grad():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True, use_cache=use_cache)
            toks = out.sequences[0].tolist()
            fl = m(torch.tensor([toks[:-1]]), use_cache=False).logits[0]
        first = None
        worst = 0.0
        for s, lg in enumerate(out.logits):
            d = float((lg[0] - fl[plen - 1 + s]).abs().max())
            worst = max(worst, d)
            if first is None and d > 1e-4:
                first = (s, plen - 1 + s, d)
        print(f"prompt {plen} use_cache {use_cache}: first step where generate's logits leave the full forward's "
              f"(step, input position, max|diff|) = {first}; worst {worst:.3e}; new tokens {toks[plen:]}")
