#!/usr/bin/env python3
"""INDEPENDENT REFERENCE, NOT HF: a from-scratch PyTorch forward of the gpt_oss architecture, written from a
reading of transformers' modeling_gpt_oss.py (no transformers import, no HF code), used to cross-check the
engine's CPU implementation while no HF golden exists for gpt_oss (tools/make_hf_goldens.py has the
"gpt_oss" case for that; run it where transformers is installed).

It needs only torch (tested with Debian's torch 1.13 at /usr/bin/python3) and writes
<out>/model/{config.json, model.safetensors}: a tiny random gpt_oss in the hub layout (float32), and
<out>/reference.safetensors: input ids / labels of two rows (40 and 23 tokens), the logits of each row, the
summed shifted cross-entropy + router_aux_loss_coef * load-balancing loss, and the gradient of that loss for
every parameter (hub names and shapes); and a 4-step fine-tune (data.jsonl, recipe.yaml: global batch 4,
micro-batches of 2, AdamW with weight decay, clipping at 1.0, aux loss coef / n_micro per micro-batch, as
tools/make_hf_goldens.py does) with its per-step loss / grad norm (expected_train.json) and final weights
(expected_final.safetensors). tests/models/test_gpt_oss.cpp (MatchesIndependentTorchReference)
compares the engine against the committed output, regenerated with
  /usr/bin/python3 tools/gpt_oss_torch_reference.py --out tests/fixtures/gpt_oss_torch_ref

What it implements (per decoder layer, x the residual stream):
  h = RMSNorm(x); q, k, v = h Wq^T + bq, ...; RoPE (half-split, YaRN inv_freq, cos/sin * attention factor)
  scores = q k^T / sqrt(D) (+ causal mask, + sliding window i - j < W on "sliding_attention" layers)
  probs = softmax([scores, sink_h]) without the sink column; o = probs v; x += o Wo^T + bo
  h = RMSNorm(x); logits = h Wr^T + br; top-k logits -> softmax over k; per expert e:
  gu = h @ gate_up_proj[e] + gate_up_proj_bias[e] ([.., 2I], gate = even columns, up = odd),
  g = min(gate, 7), u = clamp(up, -7, 7), y = ((u + 1) g sigmoid(1.702 g)) @ down_proj[e] + down_proj_bias[e]
  x += sum_k w_k y_k
  aux = E * sum_e (fraction of top-k slots on e) * (mean softmax prob of e), over all layers' real tokens
"""

import argparse
import json
import math
import os
import struct

import torch
import torch.nn.functional as F

CFG = dict(
    model_type="gpt_oss",
    architectures=["GptOssForCausalLM"],
    vocab_size=96,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=150000.0,
    rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0,
                      original_max_position_embeddings=64, truncate=False),
    attention_bias=True,
    router_aux_loss_coef=0.01,
    output_router_logits=True,
    tie_word_embeddings=False,
    torch_dtype="float32",
)
ALPHA, LIMIT = 1.702, 7.0


def make_params(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    H, D, nh, nkv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E, I, V = cfg["num_local_experts"], cfg["intermediate_size"], cfg["vocab_size"]

    def rn(*shape, std=0.02):
        return (std * torch.randn(*shape, generator=g)).float()

    p = {"model.embed_tokens.weight": rn(V, H, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        a = f"model.layers.{i}.self_attn."
        m = f"model.layers.{i}.mlp."
        p[a + "sinks"] = rn(nh, std=0.5)
        p[a + "q_proj.weight"] = rn(nh * D, H, std=0.15)
        p[a + "q_proj.bias"] = rn(nh * D, std=0.1)
        p[a + "k_proj.weight"] = rn(nkv * D, H, std=0.15)
        p[a + "k_proj.bias"] = rn(nkv * D, std=0.1)
        p[a + "v_proj.weight"] = rn(nkv * D, H, std=0.15)
        p[a + "v_proj.bias"] = rn(nkv * D, std=0.1)
        p[a + "o_proj.weight"] = rn(H, nh * D, std=0.15)
        p[a + "o_proj.bias"] = rn(H, std=0.1)
        p[m + "router.weight"] = rn(E, H, std=0.3)
        p[m + "router.bias"] = rn(E, std=0.1)
        p[m + "experts.gate_up_proj"] = rn(E, H, 2 * I, std=0.6)  # crosses the clamp at 7 now and then
        p[m + "experts.gate_up_proj_bias"] = rn(E, 2 * I, std=0.1)
        p[m + "experts.down_proj"] = rn(E, I, H, std=0.1)
        p[m + "experts.down_proj_bias"] = rn(E, H, std=0.1)
        p[f"model.layers.{i}.input_layernorm.weight"] = 1.0 + rn(H, std=0.2)
        p[f"model.layers.{i}.post_attention_layernorm.weight"] = 1.0 + rn(H, std=0.2)
    p["model.norm.weight"] = 1.0 + rn(H, std=0.2)
    p["lm_head.weight"] = rn(V, H, std=0.1)
    return p


def yarn_inv_freq(cfg):
    """inv_freq [D/2] and the attention factor, YaRN (no truncation of the correction range when
    truncate is false)."""
    D = cfg["head_dim"]
    rs = cfg["rope_scaling"]
    base, factor = cfg["rope_theta"], rs["factor"]
    orig = rs["original_max_position_embeddings"]
    att = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def corr_dim(rot):
        return (D * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(rs["beta_fast"]), corr_dim(rs["beta_slow"])
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # extrapolation weight
    return inter * (1 - keep) + extra * keep, att


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, cos, sin):  # x [T, heads, D]; cos/sin [T, D/2]
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def forward_row(p, cfg, ids):
    """One unpadded row: logits [T, V] and each layer's router logits [T, E]."""
    H, D = cfg["hidden_size"], cfg["head_dim"]
    nh, nkv, E, k = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    eps = cfg["rms_norm_eps"]
    T = ids.shape[0]
    inv, att = yarn_inv_freq(cfg)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos() * att, ang.sin() * att
    x = p["model.embed_tokens.weight"][ids]
    router_logits = []
    ii = torch.arange(T)[:, None]
    jj = torch.arange(T)[None, :]
    for li in range(cfg["num_hidden_layers"]):
        a = f"model.layers.{li}.self_attn."
        m = f"model.layers.{li}.mlp."
        h = rms(x, p[f"model.layers.{li}.input_layernorm.weight"], eps)
        q = (h @ p[a + "q_proj.weight"].T + p[a + "q_proj.bias"]).view(T, nh, D)
        kk = (h @ p[a + "k_proj.weight"].T + p[a + "k_proj.bias"]).view(T, nkv, D)
        v = (h @ p[a + "v_proj.weight"].T + p[a + "v_proj.bias"]).view(T, nkv, D)
        q, kk = rope(q, cos, sin), rope(kk, cos, sin)
        rep = nh // nkv
        kk = kk.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = torch.einsum("ihd,jhd->hij", q, kk) / math.sqrt(D)
        visible = jj <= ii
        if cfg["layer_types"][li] == "sliding_attention":
            visible = visible & (ii - jj < cfg["sliding_window"])
        s = s.masked_fill(~visible[None], float("-inf"))
        sink = p[a + "sinks"][:, None, None].expand(nh, T, 1)
        probs = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :T]
        o = torch.einsum("hij,jhd->ihd", probs, v).reshape(T, nh * D)
        x = x + o @ p[a + "o_proj.weight"].T + p[a + "o_proj.bias"]
        h = rms(x, p[f"model.layers.{li}.post_attention_layernorm.weight"], eps)
        rl = h @ p[m + "router.weight"].T + p[m + "router.bias"]
        router_logits.append(rl)
        top_v, top_i = torch.topk(rl, k, dim=-1)
        w = torch.softmax(top_v, dim=-1)
        y = torch.zeros_like(x)
        for t in range(T):
            for s_ in range(k):
                e = int(top_i[t, s_])
                gu = h[t] @ p[m + "experts.gate_up_proj"][e] + p[m + "experts.gate_up_proj_bias"][e]
                gate, up = gu[0::2].clamp(max=LIMIT), gu[1::2].clamp(min=-LIMIT, max=LIMIT)
                act = (up + 1) * gate * torch.sigmoid(ALPHA * gate)
                out = act @ p[m + "experts.down_proj"][e] + p[m + "experts.down_proj_bias"][e]
                y[t] = y[t] + w[t, s_] * out
        x = x + y
    x = rms(x, p["model.norm.weight"], eps)
    return x @ p["lm_head.weight"].T, router_logits


def aux_loss(router_logits_rows, E, k):
    """Switch-transformer load balancing over every layer's real tokens (rows are unpadded)."""
    L = len(router_logits_rows[0])
    cat = torch.cat([torch.cat([r[l] for r in router_logits_rows], 0) for l in range(L)], 0)  # [L*N, E]
    probs = torch.softmax(cat, dim=-1)
    _, sel = torch.topk(probs, k, dim=-1)
    frac = F.one_hot(sel, E).float().mean(0)  # [k, E]
    return (frac * probs.mean(0)[None]).sum() * E


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous()
        if t.dtype == torch.float32:
            dt = "F32"
        elif t.dtype == torch.int64:
            dt = "I64"
        else:
            raise ValueError(t.dtype)
        b = t.numpy().tobytes()
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ---- 4 AdamW steps (SPEC section 3, as tools/make_hf_goldens.py's train()) ----
GBS, LBS, STEPS = 4, 2, 4
LR, BETAS, EPS, WD, MAX_NORM = 1.0e-3, (0.9, 0.999), 1.0e-8, 0.1, 1.0

RECIPE = """# INDEPENDENT torch reference (tools/gpt_oss_torch_reference.py), NOT an HF golden.
seed: 42
device: cpu
model:
  pretrained_model_name_or_path: model
  dtype: float32
step_scheduler:
  global_batch_size: 4
  local_batch_size: 2
  max_steps: 4
  num_epochs: 1
dataset:
  _target_: tokenized_jsonl
  path_or_dataset: data.jsonl
dataloader:
  shuffle: false
optimizer:
  _target_: torch.optim.AdamW
  lr: 1.0e-3
  betas: [0.9, 0.999]
  eps: 1.0e-8
  weight_decay: 0.1
clip_grad_norm:
  max_norm: 1.0
loss_fn:
  _target_: masked_cross_entropy
checkpoint:
  enabled: false
"""


def make_rows(seed, vocab, n):
    """Rows of 5..40 tokens (row 1: 40, so the window of 8 cuts in), some with an ignored prompt prefix."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 40 if i == 1 else int(torch.randint(5, 41, (1,), generator=g))
        ids = [1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist()
        labels = list(ids)
        if i % 3 == 1:
            cut = int(torch.randint(1, length - 1, (1,), generator=g))
            labels[:cut] = [-100] * cut
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def train(p, cfg, rows):
    params = list(p.values())
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    coef, E, k = cfg["router_aux_loss_coef"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    steps = []
    for s in range(STEPS):
        batch = rows[s * GBS:(s + 1) * GBS]
        mbs = [batch[i:i + LBS] for i in range(0, GBS, LBS)]
        n_tok = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in batch)
        total = 0.0
        for mb in mbs:
            ce, rls = 0.0, []
            for r in mb:
                ids, lab = torch.tensor(r["input_ids"]), torch.tensor(r["labels"])
                lg, rl = forward_row(p, cfg, ids)
                rls.append(rl)
                ce = ce + F.cross_entropy(lg[:-1], lab[1:], ignore_index=-100, reduction="sum")
            aux = aux_loss(rls, E, k)
            loss = ce / n_tok + coef * aux / len(mbs)
            loss.backward()
            total += float(loss)
        gn = float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"step": s + 1, "loss": total, "grad_norm": gn, "num_label_tokens": n_tok})
        print(f"step {s + 1} loss {total:.8f} grad_norm {gn:.8f}")
    return steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=4242)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    cfg = CFG
    p = make_params(cfg, args.seed)
    os.makedirs(os.path.join(args.out, "model"), exist_ok=True)
    with open(os.path.join(args.out, "model", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(os.path.join(args.out, "model", "model.safetensors"), p)

    g = torch.Generator().manual_seed(args.seed + 1)
    V = cfg["vocab_size"]
    rows = [torch.randint(3, V, (n,), generator=g) for n in (40, 23)]
    labels = [r.clone() for r in rows]
    labels[1][:5] = -100  # a prompt prefix the loss ignores
    for t in p.values():
        t.requires_grad_(True)
    ce, logits, rls = 0.0, [], []
    for ids, lab in zip(rows, labels):
        lg, rl = forward_row(p, cfg, ids)
        logits.append(lg)
        rls.append(rl)
        ce = ce + F.cross_entropy(lg[:-1], lab[1:], ignore_index=-100, reduction="sum")
    aux = aux_loss(rls, cfg["num_local_experts"], cfg["num_experts_per_tok"])
    loss = ce + cfg["router_aux_loss_coef"] * aux
    loss.backward()
    out = {
        "ids0": rows[0], "ids1": rows[1], "labels0": labels[0], "labels1": labels[1],
        "logits0": logits[0].detach(), "logits1": logits[1].detach(),
        "ce_sum": ce.detach().reshape(1), "aux": aux.detach().reshape(1),
    }
    for n, t in p.items():
        out["grad." + n] = t.grad
    write_safetensors(os.path.join(args.out, "reference.safetensors"), out)
    print(f"ce_sum {float(ce):.8f} aux {float(aux):.8f} -> {args.out}")

    # 4 training steps from the same initial weights.
    p = make_params(cfg, args.seed)
    for t in p.values():
        t.requires_grad_(True)
    rows = make_rows(args.seed + 2, V, GBS * STEPS)
    with open(os.path.join(args.out, "data.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(args.out, "recipe.yaml"), "w") as f:
        f.write(RECIPE)
    steps = train(p, cfg, rows)
    with open(os.path.join(args.out, "expected_train.json"), "w") as f:
        json.dump({"note": "independent torch reference, NOT HF", "steps": steps}, f, indent=2)
    write_safetensors(os.path.join(args.out, "expected_final.safetensors"), {n: t.detach() for n, t in p.items()})


if __name__ == "__main__":
    main()
