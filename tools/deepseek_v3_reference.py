#!/usr/bin/env python3
"""INDEPENDENT REFERENCE, NOT HF: a plain-PyTorch re-implementation of the deepseek_v3 forward (written from
a reading of transformers' modeling_deepseek_v3.py, no transformers import), to cross-check the engine's
CPU path where transformers is not installed. The HF goldens come from tools/make_hf_goldens.py (case
deepseek_v3) on a machine with transformers.

A module of model code only: tools/ref_torch_goldens.py (case deepseek_v3) wraps make_params / forward /
hub_layout and writes tests/fixtures/ref_torch/deepseek_v3 with the goldens' own data, loop and file format.
Parameters are named as transformers 5 names them (fused experts gate_up_proj [E, 2I, H], down_proj
[E, H, I]); hub_layout gives the per-expert tensors save_pretrained writes.
"""
import math

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


