#!/usr/bin/env python3
"""Independent PyTorch reference fixtures for families whose HF goldens are not made yet.

NOT Hugging Face goldens. Where transformers is not installed (this CPU machine: Debian's python3-torch 1.13,
no transformers, no safetensors), this writes fixtures in exactly the golden format (docs/goldens.md) from our
own PyTorch implementation of a family, written from a reading of transformers' modeling code, and trains it
with the very loop of tools/make_hf_goldens.py (imported, so data, batching, loss normalisation, AdamW,
clipping and the recipe are the goldens'). They check what a reading of HF can check: the engine's forward
and backward against autograd on the same semantics, and the 4-step training loop. They cannot catch a
misreading of HF; the real goldens (tools/make_hf_goldens.py on a machine with transformers) replace them.

Writes tests/fixtures/ref_torch/<case>/ (model/, data.jsonl, recipe.yaml, expected*.json/safetensors) and
tests/fixtures/ref_torch/index.json; test_hf_golden runs them like the HF cases.

Usage:  /usr/bin/python3 tools/ref_torch_goldens.py [--out tests/fixtures/ref_torch] [--cases gemma3_text]
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys
from types import SimpleNamespace

os.environ["AM_GOLDEN_HELPERS_ONLY"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_hf_goldens as G  # noqa: E402  (data, collate, shift, training loop, recipe)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

# ------------------------------------------------------------------------------------------------
# safetensors (F32 / I64 only), enough for the fixtures
# ------------------------------------------------------------------------------------------------
_DT = {torch.float32: "F32", torch.int64: "I64"}


def save_safetensors(tensors, path, metadata=None):
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        b = t.numpy().tobytes()
        header[name] = {"dtype": _DT[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ------------------------------------------------------------------------------------------------
# Gemma 3 text (Gemma3ForCausalLM semantics, eager attention, float32); Gemma 2 (Gemma2ForCausalLM): no q/k
# norms, one RoPE, attention and final logit soft-capping (cap * tanh(x / cap))
# ------------------------------------------------------------------------------------------------
class GemmaNorm(nn.Module):
    """y = x_hat * (1 + w), computed in float32; w zero-centred."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_inv_freq(params, dim):
    inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if params.get("rope_type", "default") == "linear":
        inv = inv / params["factor"]
    elif params.get("rope_type", "default") != "default":
        raise ValueError("reference: rope type " + params["rope_type"])
    return inv


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class GemmaLayer(nn.Module):
    def __init__(self, c, i):
        super().__init__()
        H, D, nh, nkv, I = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
        self.c, self.sliding = c, c.layer_types[i] == "sliding_attention"
        attn = nn.Module()
        attn.q_proj = nn.Linear(H, nh * D, bias=False)
        attn.k_proj = nn.Linear(H, nkv * D, bias=False)
        attn.v_proj = nn.Linear(H, nkv * D, bias=False)
        attn.o_proj = nn.Linear(nh * D, H, bias=False)
        self.qk_norm = c.model_type == "gemma3_text"
        if self.qk_norm:
            attn.q_norm = GemmaNorm(D, c.rms_norm_eps)
            attn.k_norm = GemmaNorm(D, c.rms_norm_eps)
        self.self_attn = attn
        mlp = nn.Module()
        mlp.gate_proj = nn.Linear(H, I, bias=False)
        mlp.up_proj = nn.Linear(H, I, bias=False)
        mlp.down_proj = nn.Linear(I, H, bias=False)
        self.mlp = mlp
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            setattr(self, n, GemmaNorm(H, c.rms_norm_eps))

    def forward(self, x, cos, sin, key_ok):
        c, a = self.c, self.self_attn
        B, T, _ = x.shape
        D, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        h = self.input_layernorm(x)
        q = a.q_proj(h).view(B, T, nh, D)
        k = a.k_proj(h).view(B, T, nkv, D)
        if self.qk_norm:
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = a.v_proj(h).view(B, T, nkv, D).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = torch.matmul(q, k.transpose(2, 3)) * (c.query_pre_attn_scalar ** -0.5)
        cap = getattr(c, "attn_logit_softcapping", None) if not self.qk_norm else None  # gemma3 ignores it
        if cap:
            s = torch.tanh(s / cap) * cap
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        allowed = (j <= i)
        if self.sliding:
            allowed = allowed & (i - j < c.sliding_window)
        allowed = allowed[None, None] & key_ok[:, None, None, :]
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        o = torch.matmul(p, v).transpose(1, 2).reshape(B, T, nh * D)
        x = x + self.post_attention_layernorm(a.o_proj(o))
        m = self.mlp
        g = self.pre_feedforward_layernorm(x)
        y = m.down_proj(nn.functional.gelu(m.gate_proj(g), approximate="tanh") * m.up_proj(g))
        return x + self.post_feedforward_layernorm(y)


class RefGemma3(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        inner = nn.Module()
        inner.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        inner.layers = nn.ModuleList([GemmaLayer(c, i) for i in range(c.num_hidden_layers)])
        inner.norm = GemmaNorm(c.hidden_size, c.rms_norm_eps)
        self.model = inner
        rp = c.rope_parameters
        per_type = "full_attention" in rp  # gemma3: one RoPE per layer type; gemma2: one for all
        self.inv = {t: rope_inv_freq(rp[t] if per_type else rp, c.head_dim) for t in ("sliding_attention", "full_attention")}

    def forward(self, input_ids, attention_mask):
        c = self.config
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids) * torch.tensor(c.hidden_size ** 0.5).to(torch.float32)
        pos = torch.arange(T).float()
        tabs = {}
        for t, inv in self.inv.items():
            f = pos[:, None] * inv[None, :]
            emb = torch.cat((f, f), dim=-1)
            tabs[t] = (emb.cos()[None, None], emb.sin()[None, None])
        key_ok = attention_mask.bool()
        for L in self.model.layers:
            cos, sin = tabs["sliding_attention" if L.sliding else "full_attention"]
            x = L(x, cos, sin, key_ok)
        x = self.model.norm(x)
        logits = x @ self.model.embed_tokens.weight.t()  # tied lm_head
        cap = getattr(c, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return SimpleNamespace(logits=logits)

    def state_for_file(self):
        return {n: p for n, p in self.named_parameters()}  # tied: no lm_head.weight


def gemma3_config():
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    cfg = dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=300, hidden_size=64,
        intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=256, initializer_range=0.02,
        rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, eos_token_id=2, bos_token_id=1, tie_word_embeddings=True,
        rope_parameters=dict(sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                             full_attention=dict(rope_type="linear", rope_theta=1.0e6, factor=4.0)),
        attention_bias=False, attention_dropout=0.0, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=layer_types, final_logit_softcapping=None, attn_logit_softcapping=None,
        use_bidirectional_attention=False, dtype="float32",
    )
    return cfg


# ------------------------------------------------------------------------------------------------
# Phi-3 (Phi3ForCausalLM semantics, eager attention, float32): fused qkv_proj / gate_up_proj, one sliding
# window on every layer, partial rotary, LongRoPE (short factors up to original_max_position_embeddings, long
# ones when the forward's length exceeds it, cos/sin times sqrt(1 + ln(factor) / ln(original)))
# ------------------------------------------------------------------------------------------------
class LlamaNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Phi3Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        H, D, nh, nkv, I = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
        self.c = c
        attn = nn.Module()
        attn.o_proj = nn.Linear(nh * D, H, bias=False)
        attn.qkv_proj = nn.Linear(H, (nh + 2 * nkv) * D, bias=False)
        self.self_attn = attn
        mlp = nn.Module()
        mlp.gate_up_proj = nn.Linear(H, 2 * I, bias=False)
        mlp.down_proj = nn.Linear(I, H, bias=False)
        self.mlp = mlp
        self.input_layernorm = LlamaNorm(H, c.rms_norm_eps)
        self.post_attention_layernorm = LlamaNorm(H, c.rms_norm_eps)

    def forward(self, x, cos, sin, key_ok):
        c, a = self.c, self.self_attn
        B, T, _ = x.shape
        D, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        h = self.input_layernorm(x)
        qkv = a.qkv_proj(h)
        q = qkv[..., : nh * D].reshape(B, T, nh, D).transpose(1, 2)
        k = qkv[..., nh * D : (nh + nkv) * D].reshape(B, T, nkv, D).transpose(1, 2)
        v = qkv[..., (nh + nkv) * D :].reshape(B, T, nkv, D).transpose(1, 2)
        R = cos.shape[-1]

        def rot(t):
            return torch.cat([t[..., :R] * cos + rotate_half(t[..., :R]) * sin, t[..., R:]], dim=-1)

        q, k = rot(q), rot(k)
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = torch.matmul(q, k.transpose(2, 3)) * (D ** -0.5)
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        allowed = j <= i
        if c.sliding_window:
            allowed = allowed & (i - j < c.sliding_window)
        allowed = allowed[None, None] & key_ok[:, None, None, :]
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        o = torch.matmul(p, v).transpose(1, 2).reshape(B, T, nh * D)
        x = x + a.o_proj(o)
        gu = self.mlp.gate_up_proj(self.post_attention_layernorm(x))
        gate, up = gu.chunk(2, dim=-1)
        return x + self.mlp.down_proj(up * nn.functional.silu(gate))


class RefPhi3(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        inner = nn.Module()
        inner.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        inner.layers = nn.ModuleList([Phi3Layer(c) for _ in range(c.num_hidden_layers)])
        inner.norm = LlamaNorm(c.hidden_size, c.rms_norm_eps)
        self.model = inner
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        rp = c.rope_scaling
        dim = int(c.head_dim * c.partial_rotary_factor)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        base = c.rope_theta ** shape
        self.inv_short = 1.0 / (torch.tensor(rp["short_factor"], dtype=torch.float32) * base)
        self.inv_long = 1.0 / (torch.tensor(rp["long_factor"], dtype=torch.float32) * base)
        orig = c.original_max_position_embeddings
        factor = c.max_position_embeddings / orig
        self.attn_factor = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
        self.orig = orig

    def forward(self, input_ids, attention_mask):
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        inv = self.inv_long if T > self.orig else self.inv_short  # HF: seq_len = max(position_ids) + 1
        f = torch.arange(T).float()[:, None] * inv[None, :]
        emb = torch.cat((f, f), dim=-1)
        cos, sin = emb.cos() * self.attn_factor, emb.sin() * self.attn_factor
        cos, sin = cos[None, None], sin[None, None]
        key_ok = attention_mask.bool()
        for L in self.model.layers:
            x = L(x, cos, sin, key_ok)
        return SimpleNamespace(logits=self.lm_head(self.model.norm(x)))

    def state_for_file(self):
        return {n: p for n, p in self.named_parameters()}


def phi3_config():
    half = 6  # head_dim 16 x partial_rotary_factor 0.75 = 12 rotary dims
    return dict(
        architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=300, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0, hidden_act="silu", max_position_embeddings=256, original_max_position_embeddings=32,
        initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True, tie_word_embeddings=False, rope_theta=10000.0,
        rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.1 * i for i in range(half)],
                          long_factor=[1.5 + 0.7 * i for i in range(half)]),
        partial_rotary_factor=0.75, bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=24,
        head_dim=16, dtype="float32",
    )


# ------------------------------------------------------------------------------------------------
# DeepSeek-V3: tools/deepseek_v3_reference.py (a functional plain-torch model over a dict of tensors named as
# transformers 5 names the parameters) wrapped as a module, so the goldens' training loop runs it unchanged.
# ------------------------------------------------------------------------------------------------
class FunctionalModel(nn.Module):
    """Parameters under their HF names (nn.Module forbids dots in names: kept in a list beside the names)."""

    def __init__(self, params, fwd, config, file_layout, frozen=()):
        super().__init__()
        self.config = config
        self._names = list(params)
        self._plist = nn.ParameterList(
            [nn.Parameter(v.clone(), requires_grad=n not in frozen) for n, v in params.items()])
        self._fwd, self._file_layout = fwd, file_layout

    def named_parameters(self, prefix="", recurse=True, **kw):
        return iter([(n, p) for n, p in zip(self._names, self._plist)])

    def params(self):
        return dict(zip(self._names, self._plist))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self._fwd(self.params(), input_ids, attention_mask))

    def state_for_file(self):
        return {k: v.detach() for k, v in self._file_layout(self.params()).items()}


def make_deepseek_v3(c, seed):
    import deepseek_v3_reference as D

    cfg = dict(D.CFG)
    P = D.make_params(cfg, seed, True)
    frozen = {k for k in P if k.endswith("e_score_correction_bias")}  # a buffer in HF: never trained
    return FunctionalModel(P, lambda P_, ids, mask: D.forward(P_, cfg, ids, mask, True, cfg["rope_interleave"]), c,
                           lambda P_: D.hub_layout(P_, cfg), frozen)


def deepseek_v3_config():
    import deepseek_v3_reference as D

    return dict(D.CFG)


def make_nemotron_h(c, seed):
    import nemotron_h_reference as N
    cfg = dict(N.CFG)
    P = N.make_params(cfg, seed)
    frozen = {k for k in P if k.endswith("e_score_correction_bias")}  # a buffer in HF: never trained
    return FunctionalModel(P, lambda P_, ids, mask: N.forward(P_, cfg, ids, mask), c, lambda P_: N.hub_layout(P_, cfg),
                           frozen)


def nemotron_h_config():
    import nemotron_h_reference as N
    return dict(N.CFG)


def gemma2_config():
    cfg = gemma3_config()
    cfg.update(architectures=["Gemma2ForCausalLM"], model_type="gemma2", num_hidden_layers=2,
               layer_types=["sliding_attention", "full_attention"],
               rope_parameters=dict(rope_type="default", rope_theta=10000.0),
               # caps small enough to bend this tiny model's scores (|s| ~ 0.05) and logits (~1)
               attn_logit_softcapping=0.05, final_logit_softcapping=0.8)
    del cfg["use_bidirectional_attention"]
    return cfg


CASES = {
    "gemma3_text": dict(name="gemma3_text", seed=1006, make_cfg=gemma3_config, model_cls=RefGemma3, max_norm=1.0),
    "gemma2": dict(name="gemma2", seed=1008, make_cfg=gemma2_config, model_cls=RefGemma3, max_norm=1.0),
    "phi3": dict(name="phi3", seed=1007, make_cfg=phi3_config, model_cls=RefPhi3, max_norm=1.0),
    # own_init: the reference draws its own weights (stds chosen so MLA, the router and the bias matter)
    "deepseek_v3": dict(name="deepseek_v3", seed=7, make_cfg=deepseek_v3_config, make_model=make_deepseek_v3,
                        own_init=True, max_norm=1.0),
    # Nemotron-H: Mamba2 (x2), MoE (4 experts, top-2, sigmoid router + correction bias, shared expert), NoPE
    # attention, relu2 MLP (tools/nemotron_h_reference.py)
    "nemotron_h": dict(name="nemotron_h", seed=11, make_cfg=nemotron_h_config, make_model=make_nemotron_h,
                       own_init=True, max_norm=1.0),
}


def run_case(case, out_root):
    name = case["name"]
    cdir = os.path.join(out_root, name)
    shutil.rmtree(cdir, ignore_errors=True)
    os.makedirs(os.path.join(cdir, "model"))
    raw = case["make_cfg"]()
    c = SimpleNamespace(**raw)
    torch.manual_seed(case["seed"])
    model = case["make_model"](c, case["seed"]) if "make_model" in case else case["model_cls"](c)
    g = torch.Generator().manual_seed(case["seed"] + 7)
    with torch.no_grad():
        for n, p in [] if case.get("own_init") else model.named_parameters():
            if n.endswith("norm.weight"):  # zero-centred (gemma): w near 0 means scale 1
                zc = case.get("model_cls") is RefGemma3
                p.copy_((0.0 if zc else 1.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.normal_(0.0, 0.02, generator=g)
    with open(os.path.join(cdir, "model", "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
        f.write("\n")
    save_safetensors(model.state_for_file(), os.path.join(cdir, "model", "model.safetensors"), {"format": "pt"})
    rows = G.make_rows(case["seed"], c.vocab_size)
    with open(os.path.join(cdir, "data.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    ids, mask, lab = G.collate(rows[: G.LBS])
    with torch.no_grad():
        logits = model(ids, mask).logits.float()
    save_safetensors({"logits": logits, "input_ids": ids, "attention_mask": mask, "labels": lab},
                     os.path.join(cdir, "expected_logits.safetensors"))
    model.train()
    steps, grads = G.train(model, rows, case["max_norm"], None, capture=True)
    save_safetensors(model.state_for_file(), os.path.join(cdir, "expected_final.safetensors"), {"format": "pt"})
    save_safetensors({k: v for k, v in grads.items()}, os.path.join(cdir, "expected_step1_grads.safetensors"))
    G.write_recipe(os.path.join(cdir, "recipe.yaml"), case, case["max_norm"])
    with open(os.path.join(cdir, "recipe.yaml")) as f:
        text = f.read().replace("regenerate with tools/make_hf_goldens.py", "INDEPENDENT TORCH REFERENCE, not HF; "
                                "regenerate with tools/ref_torch_goldens.py")
    with open(os.path.join(cdir, "recipe.yaml"), "w") as f:
        f.write(text)
    expected = dict(case=name, model_type=raw["model_type"], steps=steps, max_norm=case["max_norm"],
                    lr_scheduler=None, reference="independent PyTorch implementation (tools/ref_torch_goldens.py), "
                    "not transformers", torch=torch.__version__)
    with open(os.path.join(cdir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")
    G.log(f"{name}: losses {[round(s['loss'], 5) for s in steps]}, grad norms {[round(s['grad_norm'], 4) for s in steps]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "ref_torch"))
    ap.add_argument("--cases", default="")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    want = [x for x in args.cases.split(",") if x] or list(CASES)
    for n in want:
        run_case(CASES[n], out)
    done = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(dict(cases=done, torch=torch.__version__, reference="independent PyTorch, not transformers"), f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
