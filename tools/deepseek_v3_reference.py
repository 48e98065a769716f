#!/usr/bin/env python3
"""INDEPENDENT REFERENCE, NOT HF: a plain-PyTorch re-implementation of the deepseek_v3 forward (written from
a reading of transformers' modeling_deepseek_v3.py, no transformers import), to cross-check the engine's
CPU path where transformers is not installed. Its outputs are NOT golden fixtures: the HF goldens come from
tools/make_hf_goldens.py (case deepseek_v3) on a machine with transformers.

  python3 tools/deepseek_v3_reference.py OUT_DIR [--seed S] [--no-q-lora] [--no-interleave]

writes OUT_DIR/model/{config.json,model.safetensors} (a tiny random model, hub per-expert layout, fp32),
OUT_DIR/ref_logits.safetensors (input_ids [2, T] I64, attention_mask [2, T] I64, logits [2, T, V] f32) and
OUT_DIR/ref_grads.safetensors: d(sum CE / N)/d param under the engine's (transformers 5) names (fused
experts gate_up_proj [E, 2I, H], down_proj [E, H, I]), labels = input_ids shifted as ForCausalLMLoss.
With --train DATA_JSONL it also runs the 4-step golden loop of docs/goldens.md (AdamW, accumulation,
clipping) and writes recipe.yaml, data.jsonl, ref_train.json and ref_final.safetensors.
tests/models/test_deepseek.cpp (DeepseekReference.*) compares against them when AM_DSV3_REF=OUT_DIR.
Needs only torch + numpy (safetensors is written by hand).
"""
import argparse
import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F

CFG = dict(
    model_type="deepseek_v3",
    architectures=["DeepseekV3ForCausalLM"],
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    v_head_dim=16,
    qk_nope_head_dim=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    hidden_act="silu",
    max_position_embeddings=256,
    initializer_range=0.02,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    rope_interleave=True,
    attention_bias=False,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                         mscale=1.0, mscale_all_dim=0.8),
    dtype="float32",
)


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        dt = {torch.float32: "F32", torch.int64: "I64"}[t.dtype]
        b = t.numpy().tobytes()
        header[name] = dict(dtype=dt, shape=list(t.shape), data_offsets=[off, off + len(b)])
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def yarn_inv_freq(c):
    """transformers' _compute_yarn_parameters for dim = qk_rope_head_dim (truncate default true)."""
    rp = c["rope_parameters"]
    dim, base, factor = c["qk_rope_head_dim"], rp["rope_theta"], rp["factor"]
    omax = rp["original_max_position_embeddings"]
    attn = get_mscale(factor, rp["mscale"]) / get_mscale(factor, rp["mscale_all_dim"])

    def corr(rot):
        return (dim * math.log(omax / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_w = 1 - ramp
    return inter * (1 - extra_w) + extra * extra_w, attn


def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def make_params(c, seed, q_lora):
    g = torch.Generator().manual_seed(seed)
    std = c["initializer_range"]
    H, nh = c["hidden_size"], c["num_attention_heads"]
    dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    rq, rkv, E, I = c["q_lora_rank"], c["kv_lora_rank"], c["n_routed_experts"], c["moe_intermediate_size"]
    P = {}

    def n(name, *shape, s=std):
        P[name] = s * torch.randn(*shape, generator=g)

    def norm(name, d):
        P[name] = 1.0 + 0.2 * torch.randn(d, generator=g)

    n("model.embed_tokens.weight", c["vocab_size"], H)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        if q_lora:
            n(a + "q_a_proj.weight", rq, H)
            norm(a + "q_a_layernorm.weight", rq)
            n(a + "q_b_proj.weight", nh * (dn + dr), rq, s=0.2)
        else:
            n(a + "q_proj.weight", nh * (dn + dr), H, s=0.2)
        n(a + "kv_a_proj_with_mqa.weight", rkv + dr, H, s=0.2)
        norm(a + "kv_a_layernorm.weight", rkv)
        n(a + "kv_b_proj.weight", nh * (dn + dv), rkv, s=0.2)
        n(a + "o_proj.weight", H, nh * dv)
        if i >= c["first_k_dense_replace"]:
            m = p + "mlp."
            n(m + "experts.gate_up_proj", E, 2 * I, H)
            n(m + "experts.down_proj", E, H, I)
            n(m + "gate.weight", E, H, s=0.3)
            n(m + "gate.e_score_correction_bias", E, s=0.1)
            Is = I * c["n_shared_experts"]
            n(m + "shared_experts.gate_proj.weight", Is, H)
            n(m + "shared_experts.up_proj.weight", Is, H)
            n(m + "shared_experts.down_proj.weight", H, Is)
        else:
            m = p + "mlp."
            n(m + "gate_proj.weight", c["intermediate_size"], H)
            n(m + "up_proj.weight", c["intermediate_size"], H)
            n(m + "down_proj.weight", H, c["intermediate_size"])
        norm(p + "input_layernorm.weight", H)
        norm(p + "post_attention_layernorm.weight", H)
    norm("model.norm.weight", H)
    n("lm_head.weight", c["vocab_size"], H)
    return P


def hub_layout(P, c):
    """Fused experts -> the hub's per-expert tensors (what save_pretrained writes)."""
    out = {}
    for k, v in P.items():
        if k.endswith("experts.gate_up_proj"):
            pre, I = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :I]
                out[f"{pre}{e}.up_proj.weight"] = v[e, I:]
        elif k.endswith("experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def route(logits, bias, c):
    """DeepseekV3MoE.route_tokens_to_experts: sigmoid, group-limited top-k on score + bias."""
    E, G, kg, k = c["n_routed_experts"], c["n_group"], c["topk_group"], c["num_experts_per_tok"]
    s = logits.sigmoid()
    choice = s.detach() + bias
    gs = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1)
    gidx = torch.topk(gs, k=kg, dim=-1, sorted=False)[1]
    gmask = torch.zeros_like(gs).scatter_(1, gidx, 1)
    smask = gmask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
    idx = torch.topk(choice.masked_fill(~smask.bool(), 0.0), k=k, dim=-1, sorted=False)[1]
    w = s.gather(1, idx)
    if c["norm_topk_prob"]:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * c["routed_scaling_factor"]


def forward(P, c, ids, mask, q_lora, interleave):
    B, T = ids.shape
    H, nh = c["hidden_size"], c["num_attention_heads"]
    dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    rkv, eps = c["kv_lora_rank"], c["rms_norm_eps"]
    inv, attn_factor = yarn_inv_freq(c)
    pos = torch.arange(T, dtype=torch.float32)
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos() * attn_factor, emb.sin() * attn_factor  # [T, dr]
    rp = c["rope_parameters"]
    scale = (dn + dr) ** -0.5 * get_mscale(rp["factor"], rp["mscale_all_dim"]) ** 2
    # causal + key padding mask [B, 1, T, T]
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    x = P["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        h = rmsnorm(x, P[p + "input_layernorm.weight"], eps)
        if q_lora:
            q = rmsnorm(h @ P[a + "q_a_proj.weight"].T, P[a + "q_a_layernorm.weight"], 1e-6) @ P[a + "q_b_proj.weight"].T
        else:
            q = h @ P[a + "q_proj.weight"].T
        q = q.view(B, T, nh, dn + dr).transpose(1, 2)
        q_pass, q_rot = q[..., :dn], q[..., dn:]
        ckv = h @ P[a + "kv_a_proj_with_mqa.weight"].T
        lat, k_rot = ckv[..., :rkv], ckv[..., rkv:]
        kv = (rmsnorm(lat, P[a + "kv_a_layernorm.weight"], 1e-6) @ P[a + "kv_b_proj.weight"].T)
        kv = kv.view(B, T, nh, dn + dv).transpose(1, 2)
        k_pass, v = kv[..., :dn], kv[..., dn:]
        k_rot = k_rot.view(B, 1, T, dr)
        if interleave:
            q_rot = q_rot.reshape(B, nh, T, dr // 2, 2).transpose(4, 3).reshape(B, nh, T, dr)
            k_rot = k_rot.reshape(B, 1, T, dr // 2, 2).transpose(4, 3).reshape(B, 1, T, dr)
        q_rot = q_rot * cos + rotate_half(q_rot) * sin
        k_rot = k_rot * cos + rotate_half(k_rot) * sin
        Q = torch.cat((q_pass, q_rot), -1)
        K = torch.cat((k_pass, k_rot.expand(B, nh, T, dr)), -1)
        s = (Q @ K.transpose(2, 3)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        pr = torch.softmax(s, -1)
        pr = torch.nan_to_num(pr)  # fully masked (padding) query rows
        o = (pr @ v).transpose(1, 2).reshape(B, T, nh * dv)
        x = x + o @ P[a + "o_proj.weight"].T
        h = rmsnorm(x, P[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        if i >= c["first_k_dense_replace"]:
            hf = h.reshape(B * T, H)
            idx, w = route(hf @ P[m + "gate.weight"].T, P[m + "gate.e_score_correction_bias"], c)
            gu, dw = P[m + "experts.gate_up_proj"], P[m + "experts.down_proj"]
            I = dw.shape[2]
            y = torch.zeros_like(hf)
            for e in range(gu.shape[0]):
                tok, slot = torch.where(idx == e)
                if tok.numel() == 0:
                    continue
                z = hf[tok] @ gu[e].T
                out = (F.silu(z[:, :I]) * z[:, I:]) @ dw[e].T
                y = y.index_add(0, tok, out * w[tok, slot, None])
            sh = F.silu(h @ P[m + "shared_experts.gate_proj.weight"].T) * (h @ P[m + "shared_experts.up_proj.weight"].T)
            x = x + y.view(B, T, H) + sh @ P[m + "shared_experts.down_proj.weight"].T
        else:
            x = x + (F.silu(h @ P[m + "gate_proj.weight"].T) * (h @ P[m + "up_proj.weight"].T)) @ P[m + "down_proj.weight"].T
    return rmsnorm(x, P["model.norm.weight"], eps) @ P["lm_head.weight"].T


def collate(rows):
    """Right-pad to the longest row: pad id 0, attention_mask 0, label -100 (docs/goldens.md)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.int64)
    mask = torch.zeros(len(rows), T, dtype=torch.int64)
    lab = torch.full((len(rows), T), -100, dtype=torch.int64)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        mask[b, :n] = 1
        lab[b, :n] = torch.tensor(r["labels"])
    return ids, mask, lab


def shift(lab):
    return torch.cat((lab[:, 1:], torch.full((lab.shape[0], 1), -100, dtype=lab.dtype)), 1)


def train(P, c, rows, q_lora, interleave, steps=4, gbs=4, lbs=2, lr=1e-3, wd=0.1, max_norm=1.0):
    """The golden loop (docs/goldens.md): AdamW over the parameters (not the correction-bias buffer),
    sum CE / N per micro-batch, accumulation, clipping; returns per-step loss and grad norm."""
    params = [v for k, v in P.items() if not k.endswith("e_score_correction_bias")]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, foreach=False)
    out = []
    for s in range(steps):
        mbs = [collate(rows[s * gbs + i : s * gbs + i + lbs]) for i in range(0, gbs, lbs)]
        n_tok = int(sum(int((shift(lab) != -100).sum()) for _, _, lab in mbs))
        total = 0.0
        for ids, mask, lab in mbs:
            logits = forward(P, c, ids, mask, q_lora, interleave)
            ce = F.cross_entropy(logits.reshape(-1, c["vocab_size"]), shift(lab).reshape(-1), ignore_index=-100,
                                 reduction="sum")
            (ce / n_tok).backward()
            total += float(ce)
        gn = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        opt.step()
        opt.zero_grad()
        out.append(dict(step=s + 1, loss=total / n_tok, grad_norm=gn, num_label_tokens=n_tok))
    return out


RECIPE = """# deepseek_v3 independent-reference run (tools/deepseek_v3_reference.py --train): NOT an HF golden.
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
  enabled: true
  checkpoint_dir: checkpoints
  save_consolidated: final
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-q-lora", action="store_true")
    ap.add_argument("--no-interleave", action="store_true")
    ap.add_argument("--train", metavar="DATA_JSONL",
                    help="also run the 4-step golden loop on these tokenized_jsonl rows (16 rows, ids < 300): writes "
                         "data.jsonl, recipe.yaml, ref_train.json and ref_final.safetensors (hub names)")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    c = dict(CFG)
    q_lora = not args.no_q_lora
    if not q_lora:
        c["q_lora_rank"] = None
    c["rope_interleave"] = not args.no_interleave
    P = make_params(c, args.seed, q_lora)
    os.makedirs(os.path.join(args.out, "model"), exist_ok=True)
    with open(os.path.join(args.out, "model", "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    write_safetensors(os.path.join(args.out, "model", "model.safetensors"), hub_layout(P, c))

    g = torch.Generator().manual_seed(args.seed + 1)
    lens, T = [13, 9], 13
    ids = torch.zeros(2, T, dtype=torch.int64)
    mask = torch.zeros(2, T, dtype=torch.int64)
    for b, n in enumerate(lens):
        ids[b, :n] = torch.randint(3, c["vocab_size"], (n,), generator=g)
        mask[b, :n] = 1
    for v in P.values():
        v.requires_grad_(not False)
    P_bias = [k for k in P if k.endswith("e_score_correction_bias")]
    for k in P_bias:
        P[k].requires_grad_(False)
    logits = forward(P, c, ids, mask, q_lora, c["rope_interleave"])
    labels = ids.masked_fill(mask == 0, -100)
    tgt = torch.cat((labels[:, 1:], torch.full((2, 1), -100)), 1)
    n_tok = int((tgt != -100).sum())
    loss = F.cross_entropy(logits.reshape(-1, c["vocab_size"]), tgt.reshape(-1), ignore_index=-100, reduction="sum")
    (loss / n_tok).backward()
    write_safetensors(os.path.join(args.out, "ref_logits.safetensors"),
                      dict(input_ids=ids, attention_mask=mask, logits=logits.detach()))
    write_safetensors(os.path.join(args.out, "ref_grads.safetensors"),
                      {k: v.grad for k, v in P.items() if v.grad is not None})
    print(f"loss/N = {float(loss) / n_tok:.6f} over N = {n_tok}; wrote {args.out}")
    if args.train:
        rows = [json.loads(l) for l in open(args.train) if l.strip()]
        for v in P.values():
            v.grad = None
        steps = train(P, c, rows, q_lora, c["rope_interleave"])
        with open(os.path.join(args.out, "data.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        with open(os.path.join(args.out, "recipe.yaml"), "w") as f:
            f.write(RECIPE)
        with open(os.path.join(args.out, "ref_train.json"), "w") as f:
            json.dump(dict(steps=steps, note="independent plain-torch reference, NOT HF"), f, indent=2)
        write_safetensors(os.path.join(args.out, "ref_final.safetensors"), hub_layout(P, c))
        for st in steps:
            print(st)


if __name__ == "__main__":
    main()
