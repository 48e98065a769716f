"""HF Transformers side of the BENCH.md workloads, measured in the same device call as the engine
(bench/run_bench.sh). Usage: python3 bench/hf_bench.py CONFIG.json B T CONFIGS

CONFIGS (comma-separated; BENCH.md anchors):
  fp32_autocast  fp32 params + bf16 autocast (what Trainer(bf16=True) does)
  bf16           bf16 params (bf16 optimizer state)
  bf16_compile   bf16 params + torch.compile
  *_grouped_mm / *_eager_experts  (MoE) experts implementation: transformers 5's grouped_mm or the per-expert loop
  peft_bf16      (W5) bf16 frozen base + HF PEFT LoRA r 8, alpha 32 on q/k/v/o/gate/up/down_proj, fp32 adapters
                 (PEFT's default autocast_adapter_dtype), AdamW over the adapters only
Random init from the config, synthetic token ids, fused AdamW lr 1e-5, sdpa attention, >= 3 warm-up steps,
10 timed steps, synchronised; peak = torch.cuda.max_memory_allocated. One JSON line per configuration.
FLOPs (PaLM): 6 x matmul params per token (active ones for MoE: router + top-k experts) + 12 L H D T.
"""
import gc
import json
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

cfg_path = sys.argv[1]
B, T = int(sys.argv[2]), int(sys.argv[3])
which = sys.argv[4].split(",")
WARM, TIMED = 3, 10


def active_matmul_params(cfg):
    H, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or H // nh
    attn = 2 * H * nh * D + 2 * H * nkv * D
    E = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if E:
        inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        ffn = E * H + cfg.num_experts_per_tok * 3 * H * inter
    else:
        ffn = 3 * H * cfg.intermediate_size
    return L * (attn + ffn) + V * H  # + lm_head (the embedding is a gather)


def run(name):
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(cfg_path)
    base = name.replace("_grouped_mm", "").replace("_eager_experts", "")
    peft = base.startswith("peft_")
    if peft:
        base = base[len("peft_"):]
    kw = dict(attn_implementation="sdpa")
    if "_grouped_mm" in name:
        kw["experts_implementation"] = "grouped_mm"
    elif "_eager_experts" in name:
        kw["experts_implementation"] = "eager"
    dtype = torch.float32 if base.startswith("fp32") else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw)
    except TypeError:  # older transformers: no experts_implementation argument
        kw.pop("experts_implementation", None)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw)
    model = model.to("cuda")
    if peft:
        from peft import LoraConfig, get_peft_model

        lc = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, lc)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    fwd = torch.compile(model) if base.endswith("compile") else model

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=base.startswith("fp32")):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(WARM):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(TIMED):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / TIMED
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    flops_tok = 6 * active_matmul_params(cfg) + 12 * L * H * D * T
    out = {"side": "hf", "config": name, "tokens_per_s": B * T / dt, "step_ms": dt * 1e3,
           "tflops": B * T / dt * flops_tok / 1e12, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
           "loss": float(loss.detach()), "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
           "experts_implementation": getattr(model.config, "_experts_implementation", kw.get("experts_implementation"))}
    if cfg.model_type == "nemotron_h":
        # HF's Mamba2 mixer takes its CUDA kernels (mamba_ssm + causal_conv1d) when they import, else its torch path.
        import importlib.util
        out["mamba_path"] = "cuda kernels" if importlib.util.find_spec("mamba_ssm") and importlib.util.find_spec("causal_conv1d") else "torch (mamba_ssm absent)"
        out["tflops"] = None  # active_matmul_params does not describe a hybrid; compare tok/s
    print(json.dumps(out), flush=True)
    del model, opt, fwd
    gc.collect()
    torch.cuda.empty_cache()


for name in which:
    try:
        run(name)
    except Exception as e:  # keep the other configurations
        print(json.dumps({"side": "hf", "config": name, "error": repr(e)[:300]}), flush=True)
