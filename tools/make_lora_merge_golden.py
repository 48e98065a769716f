#!/usr/bin/env python3
"""Golden cases for `automodel merge-lora`: HF PEFT's own merge_and_unload() on tiny random models.

For each case this writes, under OUT/<case>/:
  base/      a tiny random model (transformers save_pretrained, safetensors; sharded for some cases)
  adapter/   a PEFT LoRA adapter with random, non-zero A and B (PeftModel.save_pretrained)
  expected/  PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(...)
  case.json  what the case covers and the library versions used

and then, with --automodel BIN, runs `BIN merge-lora --base base --adapter adapter --out ours` and compares
`ours` with `expected` tensor by tensor (names, shapes, dtypes, values; number of elements that differ and the
largest difference in units of the dtype's last place).

Expectation (docs/lora.md): identical names/shapes/dtypes; fp32 tensors within a few ulps of the tensor's
largest value (torch's BLAS sums B@A in fp32 in its own order, we sum in double); bf16 tensors identical
except rare 1-ulp differences where the fp32 sum sits on a bf16 rounding boundary.

Measured 2026-12-05 (torch 2.11.0+cu130, transformers 5.17.0, peft 0.21.0, CPU merge): all 9 cases match;
fp32 max 2.0 ulp (basic) and 1.5 ulp (DoRA) of max|W'|; bf16: 0 to 2 elements per case differ by 1 ulp.

Needs torch, transformers, peft, safetensors (a GPU is not needed: the merge runs on the CPU here, and the
CPU merge is the same arithmetic PEFT uses on a GPU for fp32 adapters). Not run by CI.

  python tools/make_lora_merge_golden.py --out /tmp/lora_golden --automodel build/bin/automodel
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import torch


def tiny_llama(dtype, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_bias=bias)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_gpt2(dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(dtype)


# name -> (model builder, dtype, LoraConfig kwargs, extra)
CASES = {
    "fp32_basic": (tiny_llama, torch.float32,
                   dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]), {}),
    "bf16_basic_sharded": (tiny_llama, torch.bfloat16,
                           dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
                           {"max_shard_size": "60KB"}),
    "bf16_rslora_patterns": (tiny_llama, torch.bfloat16,
                             dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                                  rank_pattern={"model.layers.0.self_attn.q_proj": 4, "up_proj": 2},
                                  alpha_pattern={"v_proj": 5}), {}),
    "bf16_embedding_lm_head": (tiny_llama, torch.bfloat16,
                               dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]), {}),
    "bf16_dora": (tiny_llama, torch.bfloat16,
                  dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]), {"perturb_dora": True}),
    "fp32_dora": (tiny_llama, torch.float32,
                  dict(r=4, lora_alpha=8, use_dora=True, target_modules=["o_proj"]), {"perturb_dora": True}),
    "bf16_modules_to_save": (tiny_llama, torch.bfloat16,
                             dict(r=4, lora_alpha=4, target_modules=["gate_proj"], modules_to_save=["lm_head"]), {}),
    "bf16_lora_bias": (lambda dt: tiny_llama(dt, bias=True), torch.bfloat16,
                       dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "o_proj"]), {}),
    "bf16_gpt2_fan_in_fan_out": (tiny_gpt2, torch.bfloat16,
                                 dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"]), {}),
}


def make_case(root, name):
    from peft import LoraConfig, PeftModel, get_peft_model
    import peft
    import transformers

    build, dtype, lcfg, extra = CASES[name]
    d = os.path.join(root, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    base = build(dtype)
    base.save_pretrained(os.path.join(d, "base"), safe_serialization=True,
                         max_shard_size=extra.get("max_shard_size", "5GB"))

    model = get_peft_model(build(dtype), LoraConfig(init_lora_weights=False, **lcfg))  # random non-zero A and B
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1).to(p.dtype) * (0.5 if "lora_B" in n else 1.0))
                if extra.get("perturb_dora") and "lora_magnitude_vector" in n:
                    p.add_(1.0)
    model.save_pretrained(os.path.join(d, "adapter"), safe_serialization=True)

    # The merge exactly as a user runs it: a fresh base in its dtype, the adapter from disk, merge_and_unload().
    fresh = build(dtype)
    fresh.load_state_dict(base.state_dict())
    merged = PeftModel.from_pretrained(fresh, os.path.join(d, "adapter")).merge_and_unload()
    merged.save_pretrained(os.path.join(d, "expected"), safe_serialization=True)
    json.dump({"case": name, "dtype": str(dtype), "lora_config": lcfg, "torch": torch.__version__,
               "transformers": transformers.__version__, "peft": peft.__version__},
              open(os.path.join(d, "case.json"), "w"), indent=2, default=str)
    return d


def load_dir(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def ulp_of(x, dtype):
    """The unit in the last place of |x| in `dtype` (x a float64 tensor)."""
    eps = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30)))) * eps


def compare(ours_dir, expected_dir):
    """fp32: max |ours - PEFT| in ulps of the tensor's largest |value| (not of each element: where W + delta
    cancels to near 0 an element's own ulp is tiny, while both sides carry the rounding errors of the fp32
    B @ A, whose terms are as large as the tensor's values). bf16/fp16: per element, in that element's ulps."""
    ours, exp = load_dir(ours_dir), load_dir(expected_dir)
    ok = True
    if set(ours) != set(exp):
        print("  names differ: only ours %s, only expected %s" % (sorted(set(ours) - set(exp)), sorted(set(exp) - set(ours))))
        ok = False
    for k in sorted(set(ours) & set(exp)):
        a, b = ours[k], exp[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            print("  %s: ours %s %s, expected %s %s" % (k, tuple(a.shape), a.dtype, tuple(b.shape), b.dtype))
            ok = False
            continue
        if not a.is_floating_point():
            if not torch.equal(a, b):
                print("  %s: differs" % k)
                ok = False
            continue
        a64, b64 = a.double(), b.double()
        diff = (a64 - b64).abs()
        n = int((diff > 0).sum())
        if not n:
            continue
        if a.dtype == torch.float32:
            u = float((diff.max() / ulp_of(b64.abs().max(), a.dtype)))
            print("  %s: %d of %d elements differ, max %.2f ulp of max|W'| (%.3g)" % (k, n, a.numel(), u, float(diff.max())))
            ok = ok and u <= 4
        else:
            u = float((diff / ulp_of(b64, a.dtype)).max())
            print("  %s: %d of %d elements differ, max %.2f ulp" % (k, n, a.numel(), u))
            ok = ok and u <= 1 and n <= max(1, a.numel() // 1000)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--automodel", help="automodel binary: also run merge-lora and compare")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    failed = []
    for name in args.cases:
        d = make_case(args.out, name)
        print("wrote", d)
        if args.automodel:
            ours = os.path.join(d, "ours")
            shutil.rmtree(ours, ignore_errors=True)
            subprocess.run([args.automodel, "merge-lora", "--base", os.path.join(d, "base"), "--adapter",
                            os.path.join(d, "adapter"), "--out", ours], check=True)
            good = compare(ours, os.path.join(d, "expected"))
            print("%s: %s" % (name, "match" if good else "MISMATCH"))
            if not good:
                failed.append(name)
    if failed:
        print("mismatched cases:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
