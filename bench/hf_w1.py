"""HF Transformers side of BENCH.md W1, measured in the same device call as the engine (bench/run_w1.sh).

Configurations (BENCH.md anchors): fp32 params + bf16 autocast (Trainer(bf16=True)), bf16 params, bf16 params +
torch.compile. Llama-3.2-1B shape from bench/w1_config.json, random init, synthetic ids, batch 4 x 2048, fused
AdamW lr 1e-5, sdpa attention. >= 3 warm-up steps, 10 timed steps, synchronised; peak = max_memory_allocated.
Prints one JSON line per configuration.
"""
import json, sys, time, gc
import torch
from transformers import LlamaConfig, LlamaForCausalLM

cfg_path = sys.argv[1] if len(sys.argv) > 1 else "bench/w1_config.json"
which = sys.argv[2].split(",") if len(sys.argv) > 2 else ["fp32_autocast", "bf16", "bf16_compile"]
B, T, WARM, TIMED = 4, 2048, 3, 10

def run(name):
    torch.manual_seed(0)
    cfg = LlamaConfig.from_dict(json.load(open(cfg_path)))
    cfg._attn_implementation = "sdpa"
    dtype = torch.float32 if name == "fp32_autocast" else torch.bfloat16
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    fwd = torch.compile(model) if name == "bf16_compile" else model
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=(name == "fp32_autocast")):
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
    n_params = sum(p.numel() for p in model.parameters())
    L, H, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    flops_tok = 6 * (n_params - cfg.vocab_size * cfg.hidden_size + cfg.vocab_size * cfg.hidden_size) + 12 * L * H * D * T
    out = {"side": "hf", "config": name, "tokens_per_s": B * T / dt, "step_ms": dt * 1e3,
           "tflops": B * T / dt * flops_tok / 1e12, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
           "loss": float(loss), "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    print(json.dumps(out), flush=True)
    del model, opt, fwd
    gc.collect()
    torch.cuda.empty_cache()

for name in which:
    try:
        run(name)
    except Exception as e:  # keep the other configurations
        print(json.dumps({"side": "hf", "config": name, "error": repr(e)[:300]}), flush=True)
