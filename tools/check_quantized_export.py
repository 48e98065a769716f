#!/usr/bin/env python3
"""Issue 16's last acceptance item: an MXFP4 (gpt_oss) or FP8 (deepseek_v3) source checkpoint, loaded and saved by the
engine, gives a bf16 / unquantised HF folder that transformers loads as it is, with the values the quantised file
holds.

For each case it
  1. quantises the tiny golden model (tests/fixtures/golden/<case>/model, fp32) the way the hub files are:
     gpt_oss: the experts' gate_up_proj / down_proj as MXFP4 (`*_blocks` uint8 [E, R, G, 16], two E2M1 codes a byte,
              low nibble first; `*_scales` uint8 [E, R, G], E8M0 with bias 127; the dequantised [E, R, G*32] is the
              transpose of the hub's [E, in, out] layout), quantization_config {quant_method: mxfp4};
     deepseek_v3: every 2-D `*_proj.weight` as F8_E4M3 with a block-scaled `*_weight_scale_inv` [ceil(out/16),
              ceil(in/16)] (W = fp8 * scale_inv), quantization_config {quant_method: fp8, fmt: e4m3,
              weight_block_size: [16, 16]};
     and computes, independently of the engine, the dequantised weights those files stand for;
  2. runs the engine on it on the CPU: `automodel finetune` of the fixture's recipe with lr 0 for one step (AdamW with
     lr 0 leaves every weight as loaded), checkpoint on;
  3. loads the exported folder with transformers (AutoModelForCausalLM.from_pretrained, output_loading_info) and checks:
     no missing / unexpected / mismatched keys, no quantization_config and no quantised tensor names in the folder,
     every parameter equal (bit for bit, in the exported dtype) to the reference dequantised value, and the logits
     of a fixed input finite and equal to those of the reference model built by transformers from the same values;
  4. where this transformers can dequantise the quantised source itself (Mxfp4Config / FineGrainedFP8Config with
     dequantize=True), also compares our export against transformers' own dequantisation (reported; a transformers
     that cannot load it is reported, not failed).

Run where torch and transformers are installed (the GPU machine; the engine itself runs on the CPU here):
    python3 tools/check_quantized_export.py path/to/automodel [OUT_DIR]
Prints one JSON line per case and a summary; exit 1 if any check fails.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP4_LUT = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)
FP8_BLOCK = 16


def load_dir(d):
    sd = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(d, f)))
    return sd


def mxfp4_quantise(w):
    """w [E, R, C] fp32 (C a multiple of 32) -> blocks uint8 [E, R, C/32, 16], scales uint8 [E, R, C/32], and the
    dequantised [E, R, C] they stand for."""
    E, R, C = w.shape
    g = w.reshape(E, R, C // 32, 32)
    amax = g.abs().amax(-1).clamp_min(1e-30)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # 2^e * 6 >= amax
    scaled = g / torch.exp2(e)[..., None]
    codes = (scaled[..., None] - FP4_LUT).abs().argmin(-1).to(torch.uint8)  # nearest E2M1 value
    deq = FP4_LUT[codes.long()] * torch.exp2(e)[..., None]
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    scales = (e + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous(), deq.reshape(E, R, C)


def fp8_quantise(w):
    """w [O, I] fp32 -> fp8 e4m3 [O, I], scale_inv fp32 [ceil(O/16), ceil(I/16)], and fp8 * scale_inv."""
    O, I = w.shape
    bo, bi = math.ceil(O / FP8_BLOCK), math.ceil(I / FP8_BLOCK)
    s = torch.zeros(bo, bi)
    for i in range(bo):
        for j in range(bi):
            blk = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            s[i, j] = max(blk.abs().max().item(), 1e-12) / 448.0
    full = s.repeat_interleave(FP8_BLOCK, 0)[:O].repeat_interleave(FP8_BLOCK, 1)[:, :I]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, s, q.float() * full


def quantise_case(case, src_model, qdir):
    """Writes the quantised folder; returns {param name (unquantised, hub layout): dequantised fp32}."""
    sd = load_dir(src_model)
    cfg = json.load(open(os.path.join(src_model, "config.json")))
    out, deq = {}, {}
    for k, v in sd.items():
        if case == "gpt_oss" and (k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj")):
            blocks, scales, d = mxfp4_quantise(v.float().transpose(1, 2).contiguous())  # hub [E, in, out] -> [E, out, in]
            out[k + "_blocks"], out[k + "_scales"] = blocks, scales
            deq[k] = d.transpose(1, 2).contiguous()
        elif case == "deepseek_v3" and v.dim() == 2 and k.endswith("_proj.weight"):
            q, s, d = fp8_quantise(v.float())
            out[k], out[k[:-len("weight")] + "weight_scale_inv"] = q, s
            deq[k] = d
        else:
            out[k] = v
            deq[k] = v.float()
    if case == "gpt_oss":
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    else:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    os.makedirs(qdir, exist_ok=True)
    save_file(out, os.path.join(qdir, "model.safetensors"), metadata={"format": "pt"})
    json.dump(cfg, open(os.path.join(qdir, "config.json"), "w"), indent=2)
    return deq, sum(1 for k in out if k.endswith(("_blocks", "_scale_inv")))


def run_engine(automodel, fixture, work):
    for f in ("recipe.yaml", "data.jsonl"):
        shutil.copy(os.path.join(fixture, f), os.path.join(work, f))
    cmd = [automodel, "finetune", os.path.join(work, "recipe.yaml"), "--device=cpu", "--optimizer.lr=0",
           "--step_scheduler.max_steps=1", "--model.pretrained_model_name_or_path=quantised",
           "--checkpoint.enabled=true", "--checkpoint.checkpoint_dir=checkpoints"]
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    log = (r.stdout + r.stderr)[-2000:]
    return r.returncode, log, os.path.join(work, "checkpoints", "LATEST", "model", "consolidated")


def hf_dequantised(case, qdir):
    """transformers' own dequantisation of the quantised source, or (None, reason)."""
    from transformers import AutoModelForCausalLM
    try:
        if case == "gpt_oss":
            from transformers import Mxfp4Config
            qc = Mxfp4Config(dequantize=True)
        else:
            from transformers import FineGrainedFP8Config
            qc = FineGrainedFP8Config(dequantize=True)
        m = AutoModelForCausalLM.from_pretrained(qdir, quantization_config=qc, dtype=torch.float32)
        return {k: v.detach().float() for k, v in m.state_dict().items()}, ""
    except Exception as e:  # a transformers that cannot do it on this machine: reported, not failed
        return None, f"{type(e).__name__}: {str(e)[:300]}"


def check_case(case, automodel, out_root):
    from transformers import AutoModelForCausalLM
    fixture = os.path.join(ROOT, "tests", "fixtures", "golden", case)
    work = os.path.join(out_root, case)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    qdir = os.path.join(work, "quantised")
    deq, n_quantised = quantise_case(case, os.path.join(fixture, "model"), qdir)
    res = {"case": case, "quantised_tensors": n_quantised, "failures": []}
    fail = res["failures"].append
    rc, log, export = run_engine(automodel, fixture, work)
    res["engine_exit"] = rc
    if rc != 0 or not os.path.isdir(export):
        fail("engine run failed: " + log)
        return res
    cfg = json.load(open(os.path.join(export, "config.json")))
    if "quantization_config" in cfg:
        fail("the exported config.json still has quantization_config")
    names = load_dir(export)
    bad = [k for k in names if k.endswith(("_blocks", "_scales", "_scale_inv"))]
    if bad:
        fail(f"quantised tensor names in the export: {bad[:4]}")
    res["export_dtypes"] = sorted({str(v.dtype).replace("torch.", "") for v in names.values()})
    model, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(key):
            fail(f"transformers {key}: {list(info[key])[:6]}")
    # the reference: the dequantised values, rounded to the dtype each tensor was exported in
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    n_eq, worst = 0, (0.0, "")
    for k, ref in deq.items():
        if k not in names:
            fail(f"{k} is not in the export")
            continue
        want = ref.to(names[k].dtype).float()
        got = names[k].float()
        if got.shape != want.shape:
            fail(f"{k}: exported shape {tuple(got.shape)}, want {tuple(want.shape)}")
            continue
        d = (got - want).abs().max().item()
        n_eq += d == 0
        worst = max(worst, (d, k))
        if k in sd and not torch.equal(sd[k].float(), got):
            fail(f"{k}: transformers' loaded value differs from the file")
    res["tensors_bit_equal"] = f"{n_eq} of {len(deq)}"
    if worst[0] != 0:
        fail(f"exported values differ from the dequantised reference: max abs {worst[0]:.3e} ({worst[1]})")
    # logits: the export through transformers against transformers' model of the reference values
    # (saved and loaded through from_pretrained, so transformers' checkpoint conversions apply to both sides alike)
    ref_dir = os.path.join(work, "reference")
    os.makedirs(ref_dir, exist_ok=True)
    shutil.copy(os.path.join(export, "config.json"), ref_dir)
    save_file({k: v.to(names[k].dtype).contiguous() for k, v in deq.items() if k in names},
              os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})
    ref_model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 2]])
    model.eval(), ref_model.eval()
    with torch.no_grad():
        la, lb = model(ids).logits, ref_model(ids).logits
    res["logits_finite"] = bool(torch.isfinite(la).all())
    res["logits_max_abs_diff_vs_reference"] = (la - lb).abs().max().item()
    if not res["logits_finite"] or res["logits_max_abs_diff_vs_reference"] > 1e-5:
        fail("logits of the export differ from the reference model's")
    hf, why = hf_dequantised(case, qdir)
    if hf is None:
        res["transformers_dequantise"] = "not available here: " + why
    else:
        diffs = [((names[k].float() - hf[k].to(names[k].dtype).float()).abs().max().item(), k)
                 for k in names if k in hf and hf[k].shape == names[k].shape]
        res["transformers_dequantise_max_abs_diff"] = max(diffs)[0] if diffs else None
        res["transformers_dequantise_compared"] = len(diffs)
    return res


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    automodel = os.path.abspath(sys.argv[1])
    out_root = os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else "/tmp/quantised_export")
    import transformers
    ok = True
    for case in ("gpt_oss", "deepseek_v3"):
        r = check_case(case, automodel, out_root)
        r["transformers"] = transformers.__version__
        print(json.dumps(r), flush=True)
        ok &= not r["failures"]
    print("quantised export check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
