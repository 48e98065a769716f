#!/usr/bin/env python3
"""Independent plain-PyTorch Nemotron-H (NemotronHForCausalLM) reference, written from a reading of
transformers' modeling_nemotron_h.py / modular_nemotron_h.py (the torch, non-CUDA path), NOT transformers.

A functional model over a dict of tensors named as transformers 5 names the parameters (model.*; fused
experts). hub_layout() gives the names save_pretrained writes (backbone.*, backbone.embedding, per-expert
tensors). Used by tools/ref_torch_goldens.py (case nemotron_h).

Where this differs in algorithm from the engine on purpose: the Mamba2 scan is computed here in SSD's
quadratic "dual" form, y_t = sum_{s<=t} exp(cs_t - cs_s) (C_t . B_s) dt_s x_s + D x_t with cs = cumsum(dt A)
(HF's chunked torch_forward is a blocked version of the same sum), while the engine runs the sequential
recurrence with a hand-written backward; autograd gives this reference's gradients.
"""

import math

import torch
import torch.nn.functional as F

CFG = dict(
    architectures=["NemotronHForCausalLM"], model_type="nemotron_h", vocab_size=300, hidden_size=64,
    layers_block_type=["mamba", "moe", "attention", "mlp", "mamba"], num_hidden_layers=5,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attention_bias=False,
    attention_dropout=0.0, intermediate_size=96, mlp_hidden_act="relu2", mlp_bias=False,
    ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, mamba_hidden_act="silu", n_groups=2, conv_kernel=4,
    expand=2, time_step_min=0.03, time_step_max=0.1, time_step_limit=[0.0, float("inf")], time_step_floor=1e-4,
    use_conv_bias=True, chunk_size=16, use_bias=False,
    n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    num_experts_per_tok=2, routed_scaling_factor=2.5, n_group=1, topk_group=1, norm_topk_prob=True,
    num_nextn_predict_layers=0, initializer_range=0.02, layer_norm_epsilon=1e-5, residual_in_fp32=False,
    hidden_dropout=0.0, rescale_prenorm_residual=True, tie_word_embeddings=False, use_cache=True,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, dtype="float32",
)

KIND = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-", "moe": "E"}


def make_params(c, seed):
    g = torch.Generator().manual_seed(seed)

    def n(*shape, std=0.02, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    H, V = c["hidden_size"], c["vocab_size"]
    nh, P, G, S, K = c["mamba_num_heads"], c["mamba_head_dim"], c["n_groups"], c["ssm_state_size"], c["conv_kernel"]
    Din = nh * P
    Cd = Din + 2 * G * S
    D, qh, kvh = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    E, I, Is = c["n_routed_experts"], c["moe_intermediate_size"], c["moe_shared_expert_intermediate_size"]
    p = {"model.embeddings.weight": n(V, H, std=0.5)}
    for i, t in enumerate(c["layers_block_type"]):
        pre = f"model.layers.{i}."
        p[pre + "norm.weight"] = n(H, std=0.2, mean=1.0)
        m = pre + "mixer."
        k = KIND[t]
        if k == "M":
            p[m + "conv1d.weight"] = n(Cd, 1, K, std=0.4)
            p[m + "conv1d.bias"] = n(Cd, std=0.1)
            p[m + "in_proj.weight"] = n(Din + Cd + nh, H, std=0.15)
            # dt_bias = softplus^-1(dt), dt in [0.01, 0.3] (time_step_min 0.03: some dt are clamped); A_log = log(1..nh) (HF's init), perturbed
            dt = torch.exp(torch.rand(nh, generator=g) * (math.log(0.3) - math.log(0.01)) + math.log(0.01))
            p[m + "dt_bias"] = dt + torch.log(-torch.expm1(-dt))
            p[m + "A_log"] = torch.log(torch.arange(1, nh + 1, dtype=torch.float32)) + n(nh, std=0.1)
            p[m + "norm.weight"] = n(Din, std=0.2, mean=1.0)
            p[m + "D"] = n(nh, std=0.2, mean=1.0)
            p[m + "out_proj.weight"] = n(H, Din, std=0.1)
        elif k == "*":
            p[m + "q_proj.weight"] = n(qh * D, H, std=0.1)
            p[m + "k_proj.weight"] = n(kvh * D, H, std=0.1)
            p[m + "v_proj.weight"] = n(kvh * D, H, std=0.1)
            p[m + "o_proj.weight"] = n(H, qh * D, std=0.1)
        elif k == "-":
            p[m + "up_proj.weight"] = n(c["intermediate_size"], H, std=0.15)
            p[m + "down_proj.weight"] = n(H, c["intermediate_size"], std=0.1)
        else:
            p[m + "experts.up_proj"] = n(E, I, H, std=0.15)
            p[m + "experts.down_proj"] = n(E, H, I, std=0.1)
            p[m + "gate.weight"] = n(E, H, std=0.3)
            p[m + "gate.e_score_correction_bias"] = n(E, std=0.1)
            p[m + "shared_experts.up_proj.weight"] = n(Is, H, std=0.15)
            p[m + "shared_experts.down_proj.weight"] = n(H, Is, std=0.1)
    p["model.norm_f.weight"] = n(H, std=0.2, mean=1.0)
    p["lm_head.weight"] = n(V, H, std=0.1)
    return p


def hub_layout(P, c):
    """The names transformers 5 save_pretrained writes (conversion_mapping's nemotron_h renames reversed)."""
    out = {}
    for k, v in P.items():
        if k.endswith("experts.up_proj") or k.endswith("experts.down_proj"):
            base, proj = k.rsplit(".", 1)
            for e in range(v.shape[0]):
                out["backbone." + base[len("model."):] + f".{e}.{proj}.weight"] = v[e]
            continue
        if k == "model.embeddings.weight":
            out["backbone.embedding.weight"] = v
        elif k.startswith("model."):
            out["backbone." + k[len("model."):]] = v
        else:
            out[k] = v
    return out


def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def relu2(x):
    return torch.relu(x).square()


def mamba(P, m, c, h, mask):
    B, T, _ = h.shape
    nh, Pd, G, S, K = c["mamba_num_heads"], c["mamba_head_dim"], c["n_groups"], c["ssm_state_size"], c["conv_kernel"]
    Din = nh * Pd
    Cd = Din + 2 * G * S
    maskf = mask[:, :, None].to(h.dtype)
    h = h * maskf  # HF zeroes padded inputs (only padded positions change)
    proj = F.linear(h, P[m + "in_proj.weight"])
    z, xbc, dt = proj[..., :Din], proj[..., Din:Din + Cd], proj[..., Din + Cd:]
    xbc = F.conv1d(xbc.transpose(1, 2), P[m + "conv1d.weight"], P[m + "conv1d.bias"], padding=K - 1, groups=Cd)
    xbc = F.silu(xbc[..., :T].transpose(1, 2)) * maskf
    x, Bm, Cm = xbc[..., :Din], xbc[..., Din:Din + G * S], xbc[..., Din + G * S:]
    # the torch path clamps from below at time_step_min only (time_step_limit is for the CUDA kernels)
    dt = torch.clamp(F.softplus(dt + P[m + "dt_bias"]), min=c["time_step_min"])  # [B, T, nh]
    A = -torch.exp(P[m + "A_log"])
    x = x.reshape(B, T, nh, Pd)
    Bm = Bm.reshape(B, T, G, S).repeat_interleave(nh // G, dim=2)  # [B, T, nh, S]
    Cm = Cm.reshape(B, T, G, S).repeat_interleave(nh // G, dim=2)
    cs = torch.cumsum(dt * A, dim=1)  # [B, T, nh]
    diff = cs[:, :, None, :] - cs[:, None, :, :]  # [B, t, s, nh]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, :, :, None]
    L = torch.exp(diff.masked_fill(~causal, float("-inf")))
    CB = torch.einsum("bthn,bshn->btsh", Cm, Bm)
    y = torch.einsum("btsh,bshp->bthp", L * CB, x * dt[..., None]) + P[m + "D"][None, None, :, None] * x
    y = y.reshape(B, T, Din)
    gsz = Din // G
    g = (y * F.silu(z)).reshape(B, T, G, gsz)
    g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + c["layer_norm_epsilon"])).reshape(B, T, Din)
    return F.linear(P[m + "norm.weight"] * g, P[m + "out_proj.weight"])


def attention(P, m, c, h, mask):
    B, T, _ = h.shape
    D, nh, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    q = F.linear(h, P[m + "q_proj.weight"]).view(B, T, nh, D).transpose(1, 2)
    k = F.linear(h, P[m + "k_proj.weight"]).view(B, T, nkv, D).transpose(1, 2)
    v = F.linear(h, P[m + "v_proj.weight"]).view(B, T, nkv, D).transpose(1, 2)
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    s = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5  # no RoPE
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    ok = (j <= i)[None, None] & mask.bool()[:, None, None, :]
    s = s.masked_fill(~ok, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, v).transpose(1, 2).reshape(B, T, nh * D)
    return F.linear(o, P[m + "o_proj.weight"])


def route(logits, bias, c):
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


def moe(P, m, c, h):
    B, T, H = h.shape
    x = h.reshape(-1, H)
    idx, w = route(F.linear(x, P[m + "gate.weight"]), P[m + "gate.e_score_correction_bias"], c)
    y = torch.zeros_like(x)
    up, down = P[m + "experts.up_proj"], P[m + "experts.down_proj"]
    for e in range(c["n_routed_experts"]):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        o = F.linear(relu2(F.linear(x[tok], up[e])), down[e]) * w[tok, slot, None]
        y = y.index_add(0, tok, o)
    y = y + F.linear(relu2(F.linear(x, P[m + "shared_experts.up_proj.weight"])), P[m + "shared_experts.down_proj.weight"])
    return y.view(B, T, H)


def forward(P, c, ids, mask):
    x = P["model.embeddings.weight"][ids]
    eps = c["layer_norm_epsilon"]
    for i, t in enumerate(c["layers_block_type"]):
        pre = f"model.layers.{i}."
        h = rmsnorm(x, P[pre + "norm.weight"], eps)
        k, m = KIND[t], pre + "mixer."
        if k == "M":
            y = mamba(P, m, c, h, mask)
        elif k == "*":
            y = attention(P, m, c, h, mask)
        elif k == "-":
            y = F.linear(relu2(F.linear(h, P[m + "up_proj.weight"])), P[m + "down_proj.weight"])
        else:
            y = moe(P, m, c, h)
        x = x + y
    return F.linear(rmsnorm(x, P["model.norm_f.weight"], eps), P["lm_head.weight"])
