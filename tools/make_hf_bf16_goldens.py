#!/usr/bin/env python3
"""bf16 goldens: what Hugging Face computes in bf16 on the GPU for the tiny dense golden cases.

Runs on the GPU machine (torch 2.11, transformers 5.17, one CUDA device). For every case it reuses the
fp32 golden's initial weights and data (tests/fixtures/golden/<case>/model, data.jsonl: nothing there is
regenerated), loads the model with transformers on CUDA with attn_implementation="sdpa", and runs the
golden's first 4 training steps (3 optimizer updates between them) with the training semantics of
docs/goldens.md ("Training semantics": micro-batches in file order, right padding, shifted labels,
sum CE / N per micro-batch, accumulate, clip, torch AdamW), in two configurations:

  bf16      HF bf16 weights: from_pretrained(dtype=bfloat16); bf16 grads, bf16 AdamW state
  autocast  fp32 master weights + torch.autocast(bfloat16) around the forward (what Trainer(bf16=True)
            does); fp32 grads and AdamW state: the configuration whose numerics the engine's CUDA path
            follows (bf16 GEMMs/activations, fp32 master weights and optimizer)

and writes OUT/<case>/:

  expected_bf16.json               per configuration: steps[] (loss, grad_norm, lr, num_label_tokens,
                                   micro_batch_ce_sums, ...) and the first micro-batch's logits errors
                                   against the fp32 golden (expected_logits.safetensors)
  expected_bf16_logits.safetensors logits of the first micro-batch from the initial weights, bf16 values
                                   stored as F32 [B, T, V] (padded positions zeroed): logits_bf16,
                                   logits_autocast; plus input_ids, attention_mask (I64 [B, T])

plus OUT/index.json (cases, versions, device).

Usage (repository root, GPU machine):
  PYTHONUNBUFFERED=1 python3 tools/make_hf_bf16_goldens.py [--out tests/fixtures/golden_bf16] [--cases a,b]
"""

import argparse
import json
import math
import os
import sys
import traceback

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

try:
    import yaml  # noqa: E402
except ImportError:  # transformers depends on PyYAML; keep a readable error anyway
    yaml = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden")
DEFAULT_CASES = ["llama", "qwen2", "qwen3", "mistral", "gemma3_text"]  # gemma3_text once its fp32 golden exists
NUM_STEPS = 4  # every row of data.jsonl once; the losses of steps 2-4 follow 1-3 optimizer updates


def log(*a):
    print(*a, flush=True)


def collate(rows):
    """Right-pad to the longest row: pad id 0, attention_mask 0, label -100 (as tools/make_hf_goldens.py)."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(r["labels"])
    return ids, mask, labels


def shift_labels(labels):
    """HF ForCausalLMLoss: position t predicts labels[t+1]; the last position has no target."""
    s = torch.full_like(labels, -100)
    s[:, :-1] = labels[:, 1:]
    return s


def read_recipe(case_dir):
    """Batch sizes and optimizer settings of the fp32 golden's recipe."""
    with open(os.path.join(case_dir, "recipe.yaml")) as f:
        r = yaml.safe_load(f)
    if r.get("lr_scheduler"):
        raise SystemExit(f"{case_dir}: cases with an lr_scheduler are not supported here")
    o = r["optimizer"]
    return dict(
        gbs=int(r["step_scheduler"]["global_batch_size"]),
        lbs=int(r["step_scheduler"]["local_batch_size"]),
        lr=float(o["lr"]),
        betas=tuple(float(b) for b in o["betas"]),
        eps=float(o["eps"]),
        weight_decay=float(o["weight_decay"]),
        max_norm=None if r["clip_grad_norm"]["max_norm"] is None else float(r["clip_grad_norm"]["max_norm"]),
    )


def load_model(model_dir, dtype):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    m.to("cuda")
    m.train()
    for p in m.parameters():
        assert p.dtype == dtype, (model_dir, p.dtype)
    return m


def run(case_dir, rows, rc, mode):
    """The golden's first NUM_STEPS steps in configuration `mode`. Returns (steps, first micro-batch)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model = load_model(os.path.join(case_dir, "model"), dtype)
    V = model.config.vocab_size
    params = list(model.parameters())  # deduplicated: a tied weight is one parameter
    opt = torch.optim.AdamW(
        params, lr=rc["lr"], betas=rc["betas"], eps=rc["eps"], weight_decay=rc["weight_decay"], foreach=False
    )
    gbs, lbs = rc["gbs"], rc["lbs"]
    steps, first, logits_dtype = [], None, None
    for s in range(1, NUM_STEPS + 1):
        batch = rows[(s - 1) * gbs : s * gbs]
        mbs = [collate(batch[i : i + lbs]) for i in range(0, gbs, lbs)]
        n_tok = int(sum(int((shift_labels(lab) != -100).sum()) for _, _, lab in mbs))
        loss_total, mb_sums, mb_tokens = 0.0, [], []
        for j, (ids, mask, lab) in enumerate(mbs):
            ids, mask, tgt = ids.cuda(), mask.cuda(), shift_labels(lab).cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=(mode == "autocast")):
                logits = model(input_ids=ids, attention_mask=mask).logits
            logits_dtype = str(logits.dtype)  # bf16 in both configurations (recorded, not assumed)
            if s == 1 and j == 0:
                m = mask.bool().unsqueeze(-1)
                first = dict(
                    logits=torch.where(m, logits.detach().float(), torch.zeros((), device="cuda")).cpu(),
                    input_ids=ids.cpu(),
                    attention_mask=mask.cpu(),
                )
            ce_sum = F.cross_entropy(logits.float().view(-1, V), tgt.view(-1), ignore_index=-100, reduction="sum")
            (ce_sum / n_tok).backward()
            mb_sums.append(float(ce_sum.detach()))
            mb_tokens.append(int((tgt != -100).sum()))
            loss_total += float(ce_sum.detach()) / n_tok
        # The norm of the accumulated gradients in fp64 (for bf16 these are the bf16 grads HF holds), and
        # clip_grad_norm_'s own return value (bf16-rounded for bf16 grads).
        gn64 = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
        mn = rc["max_norm"]
        gn = float(torch.nn.utils.clip_grad_norm_(params, mn if mn is not None else float("inf"), foreach=False))
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(
            dict(
                step=s,
                loss=loss_total,
                grad_norm=gn,
                grad_norm_fp64=gn64,
                lr=rc["lr"],
                num_label_tokens=n_tok,
                clipped=bool(mn is not None and gn > mn),
                micro_batch_ce_sums=mb_sums,
                micro_batch_label_tokens=mb_tokens,
            )
        )
    first["logits_dtype"] = logits_dtype
    del model, opt
    torch.cuda.empty_cache()
    return steps, first


def masked_max_abs(a, b, mask):
    m = mask.bool().unsqueeze(-1).expand_as(a)
    return float((a - b).abs()[m].max())


def make_case(case, out_dir):
    case_dir = os.path.join(GOLDEN, case)
    rows = [json.loads(l) for l in open(os.path.join(case_dir, "data.jsonl")) if l.strip()]
    rc = read_recipe(case_dir)
    fp32 = json.load(open(os.path.join(case_dir, "expected.json")))
    ref = load_file(os.path.join(case_dir, "expected_logits.safetensors"))
    res, firsts = {}, {}
    for mode in ("bf16", "autocast"):
        steps, first = run(case_dir, rows, rc, mode)
        firsts[mode] = first
        assert torch.equal(first["input_ids"], ref["input_ids"]) and torch.equal(
            first["attention_mask"], ref["attention_mask"]
        ), f"{case}: first micro-batch differs from the fp32 golden's"
        mask = first["attention_mask"]
        res[mode] = dict(
            logits_dtype=first["logits_dtype"],
            steps=steps,
            logits_max_abs_vs_fp32=masked_max_abs(first["logits"], ref["logits"], mask),
            first_step_loss_rel_vs_fp32=abs(steps[0]["loss"] - fp32["steps"][0]["loss"]) / fp32["steps"][0]["loss"],
            loss_rel_vs_fp32=[
                abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(steps, fp32["steps"][:NUM_STEPS])
            ],
        )
    mask = firsts["bf16"]["attention_mask"]
    out = dict(
        case=case,
        source=f"tests/fixtures/golden/{case} (model/, data.jsonl, recipe.yaml)",
        attn_implementation="sdpa",
        device=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        transformers=transformers.__version__,
        num_steps=NUM_STEPS,
        recipe=dict(rc, betas=list(rc["betas"])),
        logits_max_abs_fp32=masked_max_abs(ref["logits"], torch.zeros_like(ref["logits"]), mask),
        logits_max_abs_bf16_vs_autocast=masked_max_abs(firsts["bf16"]["logits"], firsts["autocast"]["logits"], mask),
        fp32_losses=[s["loss"] for s in fp32["steps"][:NUM_STEPS]],
        fp32_grad_norms=[s["grad_norm"] for s in fp32["steps"][:NUM_STEPS]],
        bf16=res["bf16"],
        autocast=res["autocast"],
    )
    d = os.path.join(out_dir, case)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "expected_bf16.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    save_file(
        {
            "logits_bf16": firsts["bf16"]["logits"].contiguous(),
            "logits_autocast": firsts["autocast"]["logits"].contiguous(),
            "input_ids": firsts["bf16"]["input_ids"].contiguous(),
            "attention_mask": mask.contiguous(),
        },
        os.path.join(d, "expected_bf16_logits.safetensors"),
    )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "golden_bf16"))
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("make_hf_bf16_goldens.py: needs a CUDA device")
    if yaml is None:
        sys.exit("make_hf_bf16_goldens.py: needs PyYAML")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    cases = [c for c in a.cases.split(",") if c]
    os.makedirs(a.out, exist_ok=True)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name(0)}")
    log(f"{'case':8s} {'mode':8s} {'step':>4s} {'loss':>10s} {'fp32 loss':>10s} {'rel %':>7s} {'grad_norm':>10s} {'fp32 gn':>9s}")
    done = []
    for c in cases:
        try:
            o = make_case(c, a.out)
        except Exception:  # keep going: one broken case must not cost the other cases' device time
            traceback.print_exc()
            log(f"{c}: FAILED")
            continue
        done.append(c)
        for mode in ("bf16", "autocast"):
            for s, l32, g32 in zip(o[mode]["steps"], o["fp32_losses"], o["fp32_grad_norms"]):
                log(
                    f"{c:8s} {mode:8s} {s['step']:4d} {s['loss']:10.6f} {l32:10.6f} "
                    f"{100 * abs(s['loss'] - l32) / l32:7.4f} {s['grad_norm']:10.6f} {g32:9.6f}"
                )
            log(f"{c:8s} {mode:8s} logits max |diff| vs fp32 {o[mode]['logits_max_abs_vs_fp32']:.3e} "
                f"(max |logit| {o['logits_max_abs_fp32']:.3f})")
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump(
            dict(
                cases=done,
                torch=torch.__version__,
                transformers=transformers.__version__,
                device=torch.cuda.get_device_name(0),
            ),
            f,
            indent=1,
        )
        f.write("\n")
    if len(done) != len(cases):
        sys.exit(f"make_hf_bf16_goldens.py: {len(cases) - len(done)} case(s) failed")


if __name__ == "__main__":
    main()
