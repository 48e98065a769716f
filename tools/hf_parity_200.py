"""HF side of the 200-step loss-curve parity check (issue: CUDA parity), run on the GPU machine.

Creates a W1-shaped Llama (bench/w1_config.json) with random weights, saves it (fp32 safetensors) so the engine
starts from exactly the same weights, then fine-tunes it for STEPS steps on pre-tokenized GSM8K
(examples/demo/gsm8k_train_512.tokenized.jsonl) in file order, one micro-batch of GBS rows per step, right
padding, loss = sum token CE / label tokens (SPEC §3), fp32 params + bf16 autocast (Trainer(bf16=True)),
torch AdamW, clip 1.0. Writes one JSON line per step.
With a 5th argument `noise`, HF fine-tunes the same saved weights a second time with eager attention instead of
sdpa (same math, other kernels and reduction order) into hf_eager_training.jsonl: how far HF drifts from itself
is the noise floor the engine-vs-HF difference should be judged against.
With `bf16`, HF also fine-tunes the same weights loaded in bf16 (bf16 params, grads and AdamW state) into
hf_bf16_training.jsonl: the curve issue 15 compares pure-bf16 runs with.
    python3 tools/hf_parity_200.py OUT_DIR [STEPS=200] [GBS=8] [LR=3e-4] [noise] [bf16]
"""
import json, os, sys
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

out = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
gbs = int(sys.argv[3]) if len(sys.argv) > 3 else 8
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 3e-4
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
cfg = LlamaConfig.from_dict(json.load(open("bench/w1_config.json")))
cfg._attn_implementation = "sdpa"
model = LlamaForCausalLM(cfg).to(torch.float32)
model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
rows = [json.loads(l) for l in open("examples/demo/gsm8k_train_512.tokenized.jsonl")]


def finetune(model, log_name, bf16=False):
    # bf16=True: HF with a bf16 model (params, grads, AdamW state bf16; no autocast), torch's single-tensor AdamW
    # (foreach=False, the rounding model.dtype: bfloat16 follows, docs/precision.md).
    model = model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            **({"foreach": False} if bf16 else {}))
    log = open(os.path.join(out, log_name), "w")
    per_epoch = len(rows) // gbs
    for step in range(1, steps + 1):
        i0 = ((step - 1) % per_epoch) * gbs
        batch = rows[i0:i0 + gbs]
        T = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(gbs, T, dtype=torch.long)
        lab = torch.full((gbs, T), -100, dtype=torch.long)
        mask = torch.zeros(gbs, T, dtype=torch.long)
        for b, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[b, :n] = torch.tensor(r["input_ids"])
            lab[b, :n] = torch.tensor(r.get("labels", r["input_ids"]))
            mask[b, :n] = 1
        ids, lab, mask = ids.cuda(), lab.cuda(), mask.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        tgt = torch.cat([lab[:, 1:], torch.full((gbs, 1), -100, device="cuda")], dim=1)
        n_lab = int((tgt != -100).sum())
        loss_sum = F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100,
                                   reduction="sum")
        (loss_sum / n_lab).backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.write(json.dumps({"step": step, "loss": loss_sum.item() / n_lab, "grad_norm": float(gn),
                              "num_label_tokens": n_lab}) + "\n")
    log.close()


finetune(model, "hf_training.jsonl")
print("hf done", flush=True)
if "bf16" in sys.argv[5:]:
    del model
    torch.cuda.empty_cache()
    model = LlamaForCausalLM.from_pretrained(os.path.join(out, "model"), attn_implementation="sdpa", dtype=torch.bfloat16)
    finetune(model, "hf_bf16_training.jsonl", bf16=True)
    print("hf bf16 done", flush=True)
if "noise" in sys.argv[5:]:
    del model
    torch.cuda.empty_cache()
    m2 = LlamaForCausalLM.from_pretrained(os.path.join(out, "model"), attn_implementation="eager", dtype=torch.float32)
    finetune(m2, "hf_eager_training.jsonl")
    print("hf eager done", flush=True)
