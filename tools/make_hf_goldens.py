#!/usr/bin/env python3
"""Generate the Hugging Face golden fixtures for the dense and MoE model families.

Runs where PyTorch and transformers are installed (the GPU machine: torch 2.11, transformers 5.17);
everything is computed on the CPU in float32. For every case it builds a tiny random model, runs a
4-step fine-tune with exactly the training semantics of SPEC.md section 3 (see docs/goldens.md) and
writes tests/fixtures/golden/<case>/:

  model/config.json, model/model.safetensors   initial weights as save_pretrained writes them
  model/config_v4.json                         (case llama only) same model, transformers-4 config layout
  data.jsonl                                   tokenized_jsonl rows
  recipe.yaml                                  the automodel recipe reproducing the run (relative paths)
  expected.json                                per-step loss / grad_norm / lr / num_label_tokens
  expected_final.safetensors                   weights after the last step (names as the model file)
  expected_step1_grads.safetensors             step-1 gradients before clipping (names as the model file)
  expected_logits.safetensors                  logits of the first micro-batch from the initial weights

Usage:  PYTHONUNBUFFERED=1 python3 tools/make_hf_goldens.py [--out tests/fixtures/golden] [--cases a,b]
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only: the goldens must not depend on a GPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if __name__ != "__main__" and os.environ.get("AM_GOLDEN_HELPERS_ONLY"):
    # Imported for its data / training-loop helpers by tools/ref_torch_goldens.py, where neither
    # transformers nor safetensors is installed: the HF cases below are not defined then.
    transformers = None
    AutoModelForCausalLM = DeepseekV3Config = NemotronHConfig = Gemma2Config = Gemma3TextConfig = Phi3Config = LlamaConfig = MistralConfig = MixtralConfig = None
    OlmoeConfig = Qwen2Config = Qwen2MoeConfig = Qwen3Config = Qwen3MoeConfig = None
else:
    import transformers  # noqa: E402
    from safetensors import safe_open  # noqa: E402
    from safetensors.torch import load_file, save_file  # noqa: E402
    from transformers import (  # noqa: E402
        AutoModelForCausalLM,
        DeepseekV3Config,
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        OlmoeConfig,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

try:  # transformers >= 4.55
    from transformers import GptOssConfig  # noqa: E402
except ImportError:  # pragma: no cover
    GptOssConfig = None
try:  # transformers 5 (layers_block_type)
    from transformers import NemotronHConfig  # noqa: E402
except ImportError:  # pragma: no cover
    NemotronHConfig = None

# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=2,
)

GBS, LBS, MAX_STEPS = 4, 2, 4
LR, BETAS, EPS, WD = 1.0e-3, (0.9, 0.999), 1.0e-8, 0.1
NUM_ROWS = 16  # = GBS * MAX_STEPS: every row is used exactly once

CASES = [
    dict(
        name="llama",
        config_cls=LlamaConfig,
        seed=1001,
        kw=dict(
            tie_word_embeddings=True,
            # llama3 scaling with original_max_position_embeddings 64 (not 32): at head_dim 16 / theta 5e5 the
            # first frequency is kept, the second falls in the smoothed band, the rest are divided by 8.
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        max_norm=1.0,
        must_clip=True,
        write_v4=True,
    ),
    dict(
        name="qwen2",
        config_cls=Qwen2Config,
        seed=1002,
        kw=dict(tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1.0e6)),
        bias_std=0.1,
        max_norm=1.0,
    ),
    dict(
        name="qwen3",
        config_cls=Qwen3Config,
        seed=1003,
        kw=dict(
            head_dim=32,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1.0e6),
        ),
        max_norm=None,
    ),
    dict(
        name="mistral",
        config_cls=MistralConfig,
        seed=1004,
        kw=dict(
            head_dim=16,
            sliding_window=8,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        max_norm=1.0,
        probe_window=True,
    ),
    dict(
        name="llama_yarn_sched",
        config_cls=LlamaConfig,
        seed=1005,
        kw=dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64
            ),
        ),
        max_norm=1.0,
        lr_scheduler=dict(lr_decay_style="cosine", lr_warmup_steps=1, min_lr=1.0e-4),
    ),
    # Gemma 2: Gemma 3's layer without q/k norms, one RoPE, and both soft-caps, small enough to bend this tiny
    # model's attention scores and logits (tests/fixtures/ref_torch/gemma2 uses the same values).
    dict(
        name="gemma2",
        config_cls=Gemma2Config,
        seed=1008,
        kw=dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=0.05,
            final_logit_softcapping=0.8,
            tie_word_embeddings=True,
            pad_token_id=0,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        max_norm=1.0,
    ),
    # Phi-3: fused qkv_proj / gate_up_proj, one window on every layer, partial rotary 0.75, LongRoPE with
    # original_max_position_embeddings 32 so that micro-batches longer than 32 use the long factors.
    dict(
        name="phi3",
        config_cls=Phi3Config,
        seed=1007,
        kw=dict(
            intermediate_size=96,
            head_dim=16,
            sliding_window=24,
            partial_rotary_factor=0.75,
            original_max_position_embeddings=32,
            pad_token_id=0,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                short_factor=[1.0 + 0.1 * i for i in range(6)],
                long_factor=[1.5 + 0.7 * i for i in range(6)],
            ),
        ),
        max_norm=1.0,
    ),
    # Gemma 3: zero-centred norms (perturbed as 1 + 0.2 N like every norm here, which is fine: the weight is
    # what the file holds), sandwich norms, GeGLU, scaled embeddings, query_pre_attn_scalar != head_dim,
    # sliding / full layers with their own RoPE bases, window 8 on rows up to 40 tokens.
    dict(
        name="gemma3_text",
        config_cls=Gemma3TextConfig,
        seed=1006,
        kw=dict(
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            tie_word_embeddings=True,
            pad_token_id=0,
            rope_parameters=dict(
                sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                full_attention=dict(rope_type="linear", rope_theta=1.0e6, factor=4.0),
            ),
        ),
        max_norm=1.0,
        probe_window=True,
    ),
    # ---- MoE (docs/goldens.md): routers get std 0.3 so top-k choices are not decided by rounding ----
    dict(
        name="qwen3_moe",
        config_cls=Qwen3MoeConfig,
        seed=2001,
        kw=dict(
            num_hidden_layers=3,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],  # layer 1 is a dense MLP (intermediate_size 128)
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1.0e6),
        ),
        max_norm=1.0,
        router_std=0.3,
        write_alt_layout=True,
    ),
    dict(
        name="qwen3_moe_aux",
        config_cls=Qwen3MoeConfig,
        seed=2002,
        kw=dict(
            num_hidden_layers=2,
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            norm_topk_prob=False,
            output_router_logits=True,
            router_aux_loss_coef=0.05,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1.0e6),
        ),
        max_norm=1.0,
        router_std=0.3,
    ),
    dict(
        name="mixtral",
        config_cls=MixtralConfig,
        seed=2003,
        kw=dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=48,
            sliding_window=None,
            output_router_logits=True,
            router_aux_loss_coef=0.02,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1.0e6),
        ),
        max_norm=1.0,
        router_std=0.3,
        write_alt_layout=True,
    ),
    dict(
        name="qwen2_moe",
        config_cls=Qwen2MoeConfig,
        seed=2004,
        kw=dict(
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1.0e6),
        ),
        bias_std=0.1,
        max_norm=1.0,
        router_std=0.3,
    ),
    dict(
        name="olmoe",
        config_cls=OlmoeConfig,
        seed=2005,
        kw=dict(
            num_experts=8,
            num_experts_per_tok=2,
            intermediate_size=32,
            norm_topk_prob=False,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1.0e4),
        ),
        max_norm=1.0,
        router_std=0.3,
    ),
    # ---- gpt_oss: sinks, biased router and experts, interleaved clamped SwiGLU, alternating sliding window ----
    # sliding_window 8 with rows up to 40 tokens: layer 0 (sliding) cuts, layer 1 (full) does not. The sinks
    # (std 0.5), every bias (std 0.1, expert biases included) and the router (std 0.3) are perturbed so each
    # matters; gate_up_proj gets std 0.6 (expert_std: gate/up pre-activations of std ~5 at hidden 64) so some
    # cross the clamp at 7. swiglu_alpha / swiglu_limit keep their defaults (1.702, 7.0): some transformers
    # versions hard-code them in GptOssExperts instead of reading the config.
    dict(
        name="gpt_oss",
        config_cls=GptOssConfig,
        seed=2006,
        kw=dict(
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=32,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            attention_bias=True,
            output_router_logits=True,
            router_aux_loss_coef=0.02,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=64,
            ),
        ),
        bias_std=0.1,
        sink_std=0.5,
        expert_std=0.6,
        max_norm=1.0,
        router_std=0.3,
        probe_window=True,
    ),
    # DeepSeek-V3: MLA attention (q_lora_rank 32 -> q_a_layernorm -> q_b; kv latent 16 + one shared 8-dim rope
    # key; qk head 16 nope + 8 rope = 24 vs v head 16), interleaved rope, yarn with mscale != mscale_all_dim
    # (cos/sin scaled by mscale(4, 1) / mscale(4, 0.8), softmax scale 24^-0.5 * mscale(4, 0.8)^2); layer 0
    # dense, layers 1-2 MoE: sigmoid router, 8 experts in 4 groups, keep 2 groups, top-2, weights
    # normalised then x2.5, one shared expert; e_score_correction_bias (a buffer: never trained) perturbed so
    # that it changes which experts are selected.
    dict(
        name="deepseek_v3",
        config_cls=DeepseekV3Config,
        seed=2006,
        kw=dict(
            num_hidden_layers=3,
            num_key_value_heads=4,  # MLA builds one key per head
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_interleave=True,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=64,
                mscale=1.0,
                mscale_all_dim=0.8,
            ),
        ),
        max_norm=1.0,
        router_std=0.3,
        score_bias_std=0.1,  # router scores are sigmoid(0.3 N(0,1) . x): biases of 0.1 reorder them
    ),
    # Nemotron-H: the same tiny hybrid as the independent torch reference (tools/nemotron_h_reference.py,
    # tests/fixtures/ref_torch/nemotron_h): Mamba2 (4 heads x 8, 2 groups, state 8, conv 4), MoE (4 experts,
    # top-2, sigmoid router + correction bias, x2.5, shared relu2 expert 48), NoPE attention (head_dim 16),
    # relu2 MLP 96. chunk_size 16 so the torch path's chunked scan crosses chunks at T = 40.
    dict(
        name="nemotron_h",
        config_cls=NemotronHConfig,
        seed=2011,
        kw=dict(
            layers_block_type=["mamba", "moe", "attention", "mlp", "mamba"],
            num_hidden_layers=5,
            head_dim=16,
            intermediate_size=96,
            mlp_hidden_act="relu2",
            ssm_state_size=8,
            mamba_num_heads=4,
            mamba_head_dim=8,
            n_groups=2,
            conv_kernel=4,
            chunk_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48,
            routed_scaling_factor=2.5,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            layer_norm_epsilon=1e-5,
            tie_word_embeddings=False,
            use_mamba_kernels=False,
        ),
        max_norm=1.0,
        router_std=0.3,
        score_bias_std=0.1,
    ),
]
CASES = [c for c in CASES if c["config_cls"] is not None]


def is_router(name):
    """The router's Linear weight ([E, H]) in any layout: mlp.gate / block_sparse_moe.gate / (gpt_oss) mlp.router."""
    return name.endswith(".gate.weight") or name.endswith(".router.weight")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def log(*a):
    print(*a, flush=True)


def make_config(case):
    kw = dict(COMMON)
    kw.update(case["kw"])
    try:
        return case["config_cls"](**kw)
    except TypeError:
        # transformers 4.x: no rope_parameters argument; use the old rope_theta + rope_scaling pair.
        rp = dict(kw.pop("rope_parameters"))
        kw["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", "default") != "default":
            kw["rope_scaling"] = rp
        return case["config_cls"](**kw)


def save_pretrained(model, path):
    try:
        model.save_pretrained(path, safe_serialization=True)
    except TypeError:  # newer versions always write safetensors and may drop the argument
        model.save_pretrained(path)


def load_model(path, attn):
    try:
        m = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, torch_dtype=torch.float32)
    m.float()
    m.train()
    return m


def safetensors_keys(path):
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def make_rows(seed, vocab):
    """16 tokenized_jsonl rows: lengths 5..40, some with a -100 prompt prefix, one with a masked span."""
    rng = random.Random(seed)
    lengths = [rng.randint(5, 40) for _ in range(NUM_ROWS)]
    lengths[1] = 40  # first micro-batch: rows 0 and 1, padded to 40
    lengths[0] = min(lengths[0], 23)
    lengths[5] = 5
    rows = []
    for i, n in enumerate(lengths):
        ids = [1] + [rng.randint(3, vocab - 1) for _ in range(n - 1)]
        labels = list(ids)
        if i % 3 == 1:  # prompt prefix ignored by the loss
            p = rng.randint(1, n - 2)
            labels[:p] = [-100] * p
        elif i == 6:  # a masked span in the middle (e.g. a user turn between two answers)
            a = n // 3
            b = a + max(1, n // 4)
            labels[a:b] = [-100] * (b - a)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def collate(rows):
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


def lr_at(n, sched, total_steps):
    """NeMo AutoModel / Megatron OptimizerParamScheduler at num_steps = n (optimizer step n+1)."""
    if sched is None:
        return LR
    max_lr = LR
    init_lr = 0.1 * LR
    min_lr = sched.get("min_lr", 0.01 * LR)
    warmup = sched.get("lr_warmup_steps", min(1000, total_steps // 10))
    decay_steps = total_steps
    style = sched.get("lr_decay_style", "cosine")
    if warmup > 0 and n <= warmup:
        return init_lr + (max_lr - init_lr) * float(n) / float(warmup)
    if style == "constant":
        return max_lr
    if n > decay_steps:
        return min_lr
    r = float(n - warmup) / float(decay_steps - warmup)
    if style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * r) + 1.0)
    elif style == "linear":
        coeff = 1.0 - r
    else:
        raise ValueError(f"unsupported lr_decay_style {style}")
    return min_lr + coeff * (max_lr - min_lr)


def aux_from_logits(logits_list, num_experts, top_k, mask):
    """HF's load_balancing_loss_func (Switch Transformer eq. 4-6) over all MoE layers, padding excluded."""
    cat = torch.cat(logits_list, dim=0)  # [L*N, E]
    probs = torch.softmax(cat, dim=-1)
    _, sel = torch.topk(probs, top_k, dim=-1)
    em = F.one_hot(sel, num_experts).float()  # [L*N, k, E]
    L = len(logits_list)
    m = mask.reshape(-1).float().repeat(L)  # [L*N]
    tokens_per_expert = (em * m[:, None, None]).sum(0) / m.sum()
    prob_per_expert = (probs * m[:, None]).sum(0) / m.sum()
    return (tokens_per_expert * prob_per_expert[None]).sum() * num_experts


class RouterRecorder:
    """Forward hooks on every router (a Linear-like module with weight [E, H] named *.gate): records the
    router logits x W^T of each MoE layer, to cross-check HF's aux loss against our formula."""

    def __init__(self, model):
        self.logits, self.hooks = [], []
        for n, mod in model.named_modules():
            if (n.endswith(".gate") or n.endswith(".router")) and hasattr(mod, "weight") and mod.weight.dim() == 2:
                self.hooks.append(mod.register_forward_hook(self._hook))

    def _hook(self, mod, inp, out):
        x = inp[0]
        b = getattr(mod, "bias", None)  # gpt_oss's router has a bias
        self.logits.append(F.linear(x.reshape(-1, x.shape[-1]), mod.weight, b).detach())

    def remove(self):
        for h in self.hooks:
            h.remove()


def moe_info(config):
    """(num_experts, top_k, aux coefficient or None) for MoE configs; None for dense ones."""
    E = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not E:
        return None
    coef = config.router_aux_loss_coef if getattr(config, "output_router_logits", False) else None
    return E, config.num_experts_per_tok, coef


def train(model, rows, max_norm, sched, capture=False, aux_check=None):
    """SPEC section 3 training loop. Returns per-step records (+ step-1 grads when capture).

    MoE with output_router_logits: each micro-batch's loss also gets coef * aux / n_micro (HF adds
    coef * aux to every forward's loss; averaging over micro-batches keeps the step's loss independent of
    how the global batch is split, as the CE part is)."""
    params = list(model.parameters())  # deduplicated: a tied weight appears once
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    # torch < 2.0 (Debian's 1.13 for tools/ref_torch_goldens.py) has no foreach argument on clipping.
    clip_kw = dict(foreach=False) if int(torch.__version__.split(".")[0]) >= 2 else {}
    try:
        named_all = dict(model.named_parameters(remove_duplicate=False))
    except TypeError:  # torch < 2.0 (tools/ref_torch_goldens.py on Debian's 1.13): its models tie nothing
        named_all = dict(model.named_parameters())
    steps, step1_grads = [], None
    V = model.config.vocab_size
    moe = moe_info(model.config)
    rec = RouterRecorder(model) if moe else None
    for s in range(1, MAX_STEPS + 1):
        lr = lr_at(s - 1, sched, MAX_STEPS)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = rows[(s - 1) * GBS : s * GBS]
        mbs = [collate(batch[i : i + LBS]) for i in range(0, GBS, LBS)]
        n_tok = int(sum(int((shift_labels(lab) != -100).sum()) for _, _, lab in mbs))
        loss_total = 0.0
        mb_sums, mb_tokens, mb_aux = [], [], []
        for ids, mask, lab in mbs:
            if rec:
                rec.logits = []
            kw = dict(output_router_logits=True) if moe and moe[2] is not None else {}
            out = model(input_ids=ids, attention_mask=mask, **kw)
            logits = out.logits
            tgt = shift_labels(lab)
            ce_sum = F.cross_entropy(
                logits.float().view(-1, V), tgt.view(-1), ignore_index=-100, reduction="sum"
            )
            loss_mb = ce_sum / n_tok
            if moe and moe[2] is not None:
                aux = out.aux_loss
                mine = aux_from_logits(rec.logits, moe[0], moe[1], mask)
                if aux_check is not None:
                    aux_check.append(abs(float(aux) - float(mine)))
                loss_mb = loss_mb + moe[2] * aux / len(mbs)
                mb_aux.append(float(aux))
                loss_total += moe[2] * float(aux) / len(mbs)
            loss_mb.backward()
            mb_sums.append(float(ce_sum.detach()))
            mb_tokens.append(int((tgt != -100).sum()))
            loss_total += float(ce_sum.detach()) / n_tok
        if capture and s == 1:
            step1_grads = {n: p.grad.detach().clone() for n, p in named_all.items() if p.grad is not None}
        gn = torch.nn.utils.clip_grad_norm_(
            params, max_norm if max_norm is not None else float("inf"), **clip_kw
        )
        gn = float(gn)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec_step = dict(
            step=s,
            loss=loss_total,
            grad_norm=gn,
            lr=lr,
            num_label_tokens=n_tok,
            clipped=bool(max_norm is not None and gn > max_norm),
            micro_batch_ce_sums=mb_sums,
            micro_batch_label_tokens=mb_tokens,
        )
        if mb_aux:
            rec_step["micro_batch_aux_losses"] = mb_aux
        steps.append(rec_step)
    if rec:
        rec.remove()
    return steps, step1_grads


def fmt_float(x):
    """YAML float that every parser reads as a float (1.0e-3 style)."""
    if x is None:
        return "null"
    x = float(x)
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
        m, e = f"{x:.6e}".split("e")
        m = m.rstrip("0")
        if m.endswith("."):
            m += "0"
        return f"{m}e{int(e)}"
    return repr(x)


def write_recipe(path, case, max_norm):
    lines = [
        f"# Golden fixture '{case['name']}': regenerate with tools/make_hf_goldens.py (see docs/goldens.md).",
        "# Paths are relative to this folder.",
        "seed: 42",
        "device: cpu",
        "model:",
        "  pretrained_model_name_or_path: model",
        "  dtype: float32",
        "step_scheduler:",
        f"  global_batch_size: {GBS}",
        f"  local_batch_size: {LBS}",
        f"  max_steps: {MAX_STEPS}",
        "  num_epochs: 1",
        "dataset:",
        "  _target_: tokenized_jsonl",
        "  path_or_dataset: data.jsonl",
        "dataloader:",
        "  shuffle: false",
        "optimizer:",
        "  _target_: torch.optim.AdamW",
        f"  lr: {fmt_float(LR)}",
        f"  betas: [{fmt_float(BETAS[0])}, {fmt_float(BETAS[1])}]",
        f"  eps: {fmt_float(EPS)}",
        f"  weight_decay: {fmt_float(WD)}",
    ]
    sched = case.get("lr_scheduler")
    if sched:
        lines += [
            "lr_scheduler:",
            f"  lr_decay_style: {sched['lr_decay_style']}",
            f"  lr_warmup_steps: {sched['lr_warmup_steps']}",
            f"  min_lr: {fmt_float(sched['min_lr'])}",
        ]
    lines += [
        "clip_grad_norm:",
        f"  max_norm: {fmt_float(max_norm)}",
        "loss_fn:",
        "  _target_: masked_cross_entropy",
        "checkpoint:",
        "  enabled: true",
        "  checkpoint_dir: checkpoints",
        "  save_consolidated: final",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_v4_config(model_dir):
    """Same model in the transformers-4 hub layout: rope_theta + rope_scaling (with rope_type)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    rp = dict(cfg.pop("rope_parameters"))
    v4 = {}
    for k, v in cfg.items():
        if k == "dtype":
            v4["torch_dtype"] = v
        elif k == "transformers_version":
            v4[k] = "4.57.1"
        else:
            v4[k] = v
    v4["rope_theta"] = rp.pop("rope_theta")
    rp.pop("partial_rotary_factor", None)
    v4["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
    v4 = dict(sorted(v4.items()))
    path = os.path.join(model_dir, "config_v4.json")
    with open(path, "w") as f:
        json.dump(v4, f, indent=2)
        f.write("\n")
    # Check that transformers reads it back to the same rope parameters.
    back = LlamaConfig.from_json_file(path)
    ref = LlamaConfig.from_json_file(os.path.join(model_dir, "config.json"))
    same = dict(back.rope_parameters) == dict(ref.rope_parameters)
    log(f"  config_v4.json re-read: rope_parameters {dict(back.rope_parameters)} same_as_v5={same}")
    return same


def probe_sliding_window(model, rows):
    """Which keys does layer 0 attend to? (eager attention weights are exactly 0 where masked)."""
    r = next(r for r in rows if len(r["input_ids"]) == 40)
    ids = torch.tensor([r["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    att = out.attentions[0][0, 0]
    res = {}
    for q in (0, 5, 7, 8, 20, 39):
        nz = (att[q] > 0).nonzero().flatten().tolist()
        res[q] = (min(nz), max(nz), len(nz))
    log("  sliding-window probe (query: first key, last key, #keys): " + str(res))
    return res


def expert_layout(keys):
    """'per_expert' (hub / transformers-4 names), 'fused' (transformers-5 names) or None (dense)."""
    if any(re.search(r"\.experts\.\d+\.", k) for k in keys):
        return "per_expert"
    if any(k.endswith(".experts.gate_up_proj") for k in keys):
        return "fused"
    return None


def convert_layout(sd, model_type, num_experts):
    """The same weights in the other expert layout (per-expert <-> fused), as plain tensors."""
    mixtral = model_type == "mixtral"
    g, u, d = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out = {}
    if expert_layout(sd.keys()) == "per_expert":
        layers = {}
        for k, v in sd.items():
            m = re.match(r"(.*)\.experts\.(\d+)\.(\w+)\.weight$", k)
            if not m:
                out[k.replace(".block_sparse_moe.", ".mlp.")] = v
                continue
            layers.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = v
        for pre, t in layers.items():
            pre5 = pre.replace(".block_sparse_moe", ".mlp")
            gate = torch.stack([t[(e, g)] for e in range(num_experts)])
            up = torch.stack([t[(e, u)] for e in range(num_experts)])
            out[pre5 + ".experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
            out[pre5 + ".experts.down_proj"] = torch.stack([t[(e, d)] for e in range(num_experts)]).contiguous()
    else:
        for k, v in sd.items():
            pre = k.rsplit(".experts.", 1)[0] if ".experts." in k else None
            pre4 = pre.replace(".mlp", ".block_sparse_moe") if (pre and mixtral) else pre
            if k.endswith(".experts.gate_up_proj"):
                inter = v.shape[1] // 2
                for e in range(num_experts):
                    out[f"{pre4}.experts.{e}.{g}.weight"] = v[e, :inter].contiguous()
                    out[f"{pre4}.experts.{e}.{u}.weight"] = v[e, inter:].contiguous()
            elif k.endswith(".experts.down_proj"):
                for e in range(num_experts):
                    out[f"{pre4}.experts.{e}.{d}.weight"] = v[e].contiguous()
            elif mixtral and ".mlp.gate." in k:
                out[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
            else:
                out[k] = v
    return out


def dump_config_defaults(out_root):
    """Each MoE config class's defaults, to check the engine's config.json defaults against."""
    res = {}
    for cls in (Qwen3MoeConfig, Qwen2MoeConfig, MixtralConfig, OlmoeConfig, GptOssConfig, DeepseekV3Config):
        if cls is None:
            continue
        try:
            res[cls.__name__] = json.loads(cls().to_json_string(use_diff=False))
        except Exception as e:  # noqa: BLE001
            res[cls.__name__] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_root, "moe_config_defaults.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def run_case(case, out_root):
    name = case["name"]
    cdir = os.path.join(out_root, name)
    if os.path.exists(cdir):
        shutil.rmtree(cdir)
    os.makedirs(cdir)
    model_dir = os.path.join(cdir, "model")
    log(f"== {name}")

    # 1. random init from the config, then perturb norms (and biases) so they are tested.
    torch.manual_seed(case["seed"])
    cfg = make_config(case)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.float()
    g = torch.Generator().manual_seed(case["seed"] + 7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif (n.endswith(".bias") or n.endswith("_bias")) and case.get("bias_std"):
                p.copy_(case["bias_std"] * torch.randn(p.shape, generator=g))
            elif n.endswith(".sinks") and case.get("sink_std"):
                p.copy_(case["sink_std"] * torch.randn(p.shape, generator=g))
            elif n.endswith(".experts.gate_up_proj") and case.get("expert_std"):  # down_proj keeps its init
                p.copy_(case["expert_std"] * torch.randn(p.shape, generator=g))
            elif is_router(n) and case.get("router_std"):
                p.copy_(case["router_std"] * torch.randn(p.shape, generator=g))
        # deepseek_v3: mlp.gate.e_score_correction_bias is a buffer (selection only, never trained); HF starts
        # it at zero, which would leave its effect untested.
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias") and case.get("score_bias_std"):
                b.copy_(case["score_bias_std"] * torch.randn(b.shape, generator=g))
    save_pretrained(model, model_dir)
    del model
    src_keys = safetensors_keys(os.path.join(model_dir, "model.safetensors"))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    log(f"  tied={tied} lm_head.weight in file: {'lm_head.weight' in src_keys}; {len(src_keys)} tensors")
    if case.get("write_v4"):
        try:
            write_v4_config(model_dir)
        except Exception as e:  # noqa: BLE001
            log(f"  config_v4.json failed: {type(e).__name__}: {e}")

    # 2. data
    rows = make_rows(case["seed"], cfg.vocab_size)
    with open(os.path.join(cdir, "data.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    # 3. logits of the first micro-batch from the initial weights (eager)
    model = load_model(model_dir, "eager")
    ids, mask, lab = collate(rows[:LBS])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    save_file(
        {"logits": logits.contiguous(), "input_ids": ids, "attention_mask": mask, "labels": lab},
        os.path.join(cdir, "expected_logits.safetensors"),
    )
    # padding must not change any real token: each row alone vs in the padded micro-batch
    pad_diff = 0.0
    with torch.no_grad():
        for b, r in enumerate(rows[:LBS]):
            single = torch.tensor([r["input_ids"]])
            lo = model(input_ids=single, attention_mask=torch.ones_like(single)).logits.float()[0]
            pad_diff = max(pad_diff, float((lo - logits[b, : len(r["input_ids"])]).abs().max()))
    log(f"  padding invariance: max |logits(row alone) - logits(padded)| = {pad_diff:.3e}")
    probe = probe_sliding_window(model, rows) if case.get("probe_window") else None

    # 4. train (eager), capturing step-1 grads
    max_norm = case["max_norm"]
    sched = case.get("lr_scheduler")
    aux_check = []
    steps, grads = train(model, rows, max_norm, sched, capture=True, aux_check=aux_check)
    if case.get("must_clip") and not any(st["clipped"] for st in steps):
        # The natural grad norm stayed under 1: lower max_norm so that this case exercises clipping.
        gn1 = steps[0]["grad_norm"]
        max_norm = float(f"{0.5 * gn1:.2g}")
        log(f"  no step clipped at max_norm {case['max_norm']}: using max_norm {max_norm} instead")
        del model
        model = load_model(model_dir, "eager")
        steps, grads = train(model, rows, max_norm, sched, capture=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        shutil.copy(os.path.join(tmp, "model.safetensors"), os.path.join(cdir, "expected_final.safetensors"))
    final_keys = safetensors_keys(os.path.join(cdir, "expected_final.safetensors"))
    if sorted(final_keys) != sorted(src_keys):
        log(f"  WARNING: final tensor names differ from the source file: {sorted(final_keys)} vs {sorted(src_keys)}")
    layout = expert_layout(src_keys)
    if layout is None:
        missing = [k for k in src_keys if k not in grads]
        if missing:
            log(f"  WARNING: no gradient for {missing}")
        gsave = {k: grads[k].contiguous() for k in src_keys if k in grads}
    else:
        # MoE: gradients under transformers-5 parameter names (fused experts [E, 2I, H] / [E, H, I]; gpt_oss: its
        # own [E, H, 2I] / [E, I, H], which test_hf_golden compares in that layout).
        gsave = {k: v.contiguous() for k, v in grads.items()}
    save_file(gsave, os.path.join(cdir, "expected_step1_grads.safetensors"))
    if layout and case.get("write_alt_layout"):
        alt = convert_layout(load_file(os.path.join(model_dir, "model.safetensors")), cfg.model_type,
                             moe_info(cfg)[0])
        alt_dir = os.path.join(cdir, "model_alt")
        os.makedirs(alt_dir)
        shutil.copy(os.path.join(model_dir, "config.json"), alt_dir)
        save_file(alt, os.path.join(alt_dir, "model.safetensors"), metadata={"format": "pt"})
        # transformers must read the other layout to the same model: same logits.
        m_alt = load_model(alt_dir, "eager")
        with torch.no_grad():
            lo_alt = m_alt(input_ids=ids, attention_mask=mask).logits.float()
        alt_diff = float((lo_alt - logits).abs().max())
        log(f"  alt layout ({expert_layout(alt.keys())}): max |logits diff| = {alt_diff:.3e}")
        del m_alt
    else:
        alt_diff = None

    # 5. sdpa cross-check (same weights, same loop)
    try:
        m2 = load_model(model_dir, "sdpa")
        steps2, _ = train(m2, rows, max_norm, sched)
        sdpa_loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(steps, steps2))
        sdpa_gn = max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(steps, steps2))
        log(f"  sdpa vs eager: max |dloss| = {sdpa_loss:.3e}, max |dgrad_norm| = {sdpa_gn:.3e}")
    except Exception as e:  # noqa: BLE001
        sdpa_loss = sdpa_gn = None
        log(f"  sdpa check failed: {type(e).__name__}: {e}")

    # 6. recipe + expected.json
    write_recipe(os.path.join(cdir, "recipe.yaml"), case, max_norm)
    expected = dict(
        case=name,
        model_type=cfg.model_type,
        steps=steps,
        max_norm=max_norm,
        lr_scheduler=sched,
        attn_implementation="eager",
        sdpa_max_abs_loss_diff=sdpa_loss,
        sdpa_max_abs_grad_norm_diff=sdpa_gn,
        padding_max_abs_logit_diff=pad_diff,
        sliding_window_probe=({str(k): list(v) for k, v in probe.items()} if probe else None),
        expert_layout=layout,
        alt_layout_max_abs_logit_diff=alt_diff,
        aux_formula_max_abs_diff=(max(aux_check) if aux_check else None),
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    with open(os.path.join(cdir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")
    return expected


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "golden"))
    ap.add_argument("--cases", default="", help="comma-separated subset of case names")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    out_root = os.path.abspath(args.out)
    os.makedirs(out_root, exist_ok=True)
    want = [c for c in args.cases.split(",") if c]
    cases = [c for c in CASES if not want or c["name"] in want]
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    dump_config_defaults(out_root)

    results, failed = [], []
    for case in cases:
        try:
            results.append(run_case(case, out_root))
        except Exception as e:  # noqa: BLE001 - keep going so one bad case does not lose the others
            import traceback

            traceback.print_exc()
            failed.append(case["name"])
    with open(os.path.join(out_root, "index.json"), "w") as f:
        json.dump(
            dict(
                cases=[r["case"] for r in results],
                torch=torch.__version__,
                transformers=transformers.__version__,
            ),
            f,
            indent=2,
        )
        f.write("\n")

    log("\ncase               step  loss               grad_norm          lr          ntok  clip")
    for r in results:
        for st in r["steps"]:
            log(
                f"{r['case']:<18} {st['step']:>4}  {st['loss']:<.12f}  {st['grad_norm']:<.12f}  "
                f"{st['lr']:<.4e}  {st['num_label_tokens']:>4}  {'yes' if st['clipped'] else 'no'}"
            )
    if failed:
        log(f"FAILED cases: {failed}")
        sys.exit(1)


if __name__ == "__main__":
    main()
