#!/usr/bin/env python3
"""Generate the HF PEFT LoRA golden fixtures (SPEC.md "LoRA (`peft:`)"; docs/goldens.md for the base cases).

Runs where PyTorch, transformers, peft and safetensors are installed (the GPU machine: torch 2.11,
transformers 5.17, peft 0.2x); everything is computed on the CPU in float32. Each case reuses a committed
base model and data set of tests/fixtures/golden/<base>/ (nothing of them is copied), puts a LoRA adapter
with non-zero random A and B on it, and fine-tunes only the LoRA weights for 4 steps with exactly the
training semantics of tools/make_hf_goldens.py (SPEC.md section 3). It writes
tests/fixtures/lora_golden/<case>/:

  adapter_init/                       the starting adapter (PEFT save_pretrained: adapter_config.json +
                                      adapter_model.safetensors); the recipe's peft.adapter_path
  recipe.yaml                         the automodel recipe reproducing the run (paths relative to the case folder)
  expected.json                       per-step loss / grad_norm / lr / num_label_tokens (+ clipped,
                                      micro-batch CE sums and label counts), the modules PEFT wrapped, the
                                      adapter keys and shapes, cross-checks, greedy generations
  expected_logits.safetensors         `logits` of the first micro-batch (rows 0, 1) from base + adapter_init,
                                      `logits_final` from base + the trained adapter, with `input_ids`,
                                      `attention_mask`, `labels`
  expected_step1_grads.safetensors    step-1 gradients of the LoRA weights (both micro-batches accumulated,
                                      before clipping) under the adapter file's key names
  expected_adapter/                   the adapter after the 4 steps (PEFT save_pretrained)

plus index.json (cases, versions). tests/fixtures/lora_golden/README.md describes the fixtures.

Cases: llama, qwen3, qwen3_moe (LoRA on q/k/v/o/gate/up/down_proj) and qwen3_moe_experts (q/o_proj modules
plus PEFT `target_parameters` on the fused 3-D expert weights mlp.experts.gate_up_proj / down_proj).

Usage:  PYTHONUNBUFFERED=1 python3 tools/make_lora_goldens.py [--out tests/fixtures/lora_golden] [--cases a,b]
"""

import argparse
import json
import math
import os
import shutil
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only: the goldens must not depend on a GPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; never ask the hub

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# The dense goldens' helpers define the training semantics: same collate (right padding, pad id 0, mask 0,
# label -100), same shift, same batch sizes, optimizer hyper-parameters and model loading.
from make_hf_goldens import (  # noqa: E402
    BETAS,
    EPS,
    GBS,
    LBS,
    LR,
    MAX_STEPS,
    WD,
    collate,
    fmt_float,
    load_model,
    shift_labels,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden")

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8
B_STD = 0.05  # lora_B ~ N(0, B_STD); lora_A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5)) bound)
MAX_NORM = 1.0
GEN_PROMPT = [1, 5, 17, 42, 99]
GEN_NEW_TOKENS = 16
GEN_EXTRA_LEN = 8

CASES = [
    dict(name="llama", base="llama", seed=3001, lora=dict(target_modules=list(ALL_PROJ))),
    dict(name="qwen3", base="qwen3", seed=3003, lora=dict(target_modules=list(ALL_PROJ))),
    # transformers 5 holds Qwen3-MoE experts as fused 3-D parameters (mlp.experts.gate_up_proj [E, 2I, H],
    # mlp.experts.down_proj [E, H, I]); layer 1 is a dense MLP (mlp_only_layers [1]). Which modules PEFT wraps
    # here (and whether it rewrites the config for transformers 5) is recorded in expected.json.
    dict(name="qwen3_moe", base="qwen3_moe", seed=3006, lora=dict(target_modules=list(ALL_PROJ))),
    # PEFT's ParamWrapper on the fused expert parameters (lora_dropout must be 0). Provisional for the engine.
    dict(
        name="qwen3_moe_experts",
        base="qwen3_moe",
        seed=3007,
        lora=dict(
            target_modules=["q_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
        provisional=True,
    ),
]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def log(*a):
    print(*a, flush=True)


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def safetensors_shapes(path):
    with safe_open(path, framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def json_default(o):
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, torch.dtype):
        return str(o)
    return str(o)


def make_lora_config(case):
    kw = dict(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        init_lora_weights=True,
        task_type="CAUSAL_LM",
        bias="none",
    )
    kw.update(case["lora"])
    return LoraConfig(**kw)


def save_adapter(pm, path):
    """PeftModel.save_pretrained into a fresh folder; the generated model card (README.md) is dropped."""
    if os.path.exists(path):
        shutil.rmtree(path)
    # save_embedding_layers=False: nothing here targets embeddings, and "auto" would look the base up by
    # base_model_name_or_path (a relative path that need not resolve from the current directory).
    pm.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)
    card = os.path.join(path, "README.md")
    if os.path.exists(card):
        os.remove(card)
    with open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f)


def peft_module_name(name):
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def lora_modules(pm):
    """Every module PEFT wrapped for the adapter 'default', with its rank, scale and LoRA shapes."""
    out = []
    for name, mod in pm.named_modules():
        la = getattr(mod, "lora_A", None)
        if not isinstance(la, torch.nn.ModuleDict) or "default" not in la:
            continue
        ent = dict(
            name=peft_module_name(name),
            cls=type(mod).__name__,
            r=int(mod.r["default"]),
            lora_alpha=float(mod.lora_alpha["default"]),
            scaling=float(mod.scaling["default"]),
            in_features=getattr(mod, "in_features", None),
            out_features=getattr(mod, "out_features", None),
            lora_A_shape=list(mod.lora_A["default"].weight.shape),
            lora_B_shape=list(mod.lora_B["default"].weight.shape),
        )
        if hasattr(mod, "parameter_name"):  # lora.ParamWrapper (target_parameters)
            ent["parameter_name"] = mod.parameter_name
            ent["num_experts"] = int(getattr(mod, "num_experts", 1))
            ent["param_shape"] = list(mod.get_param().shape)
            ent["is_transposed"] = bool(getattr(mod.get_base_layer(), "is_transposed", False))
            ent["swapped_in_out"] = bool(getattr(mod, "_did_swap_in_out_features", False))
        out.append(ent)
    return out


def candidate_linears(model, targets):
    """nn.Linear modules of the plain base model whose name ends with one of the requested target_modules."""
    res = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            res.append(name)
    return res


def init_lora_weights(pm, seed):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) with in = A.shape[1]; B ~ N(0, B_STD); one seeded generator, parameters in
    named_parameters order."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float32) * 2.0 - 1.0) * bound)
                n += 1
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * B_STD)
                n += 1
    return n


def disk_names(pm):
    """Trainable parameter name -> its key in adapter_model.safetensors (PEFT's own state-dict mapping,
    matched by storage; PEFT drops the adapter name: ...lora_A.default.weight -> ...lora_A.weight)."""
    sd = get_peft_model_state_dict(pm, save_embedding_layers=False)
    by_ptr = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            by_ptr.setdefault(v.data_ptr(), []).append(k)
    res = {}
    for n, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        ks = by_ptr.get(p.data_ptr(), [])
        res[n] = ks[0] if len(ks) == 1 else n.replace(".default.", ".").replace(".default", "")
    return res


def first_micro_batch(rows):
    return collate(rows[:LBS])


def mb_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def max_abs_masked(a, b, mask):
    m = mask.bool()
    return float((a[m] - b[m]).abs().max())


def greedy(model, prompt_ids, new_tokens, eos):
    """HF generate(do_sample=False) from one unpadded prompt; the new tokens and the top-2 logit gap per step."""
    model.eval()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=eos if eos else None,
            pad_token_id=eos[0] if eos else 0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, ids.shape[1]:].tolist()
    margins = []
    for step in out.logits:
        top = torch.topk(step[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    return new, margins


def eos_ids(model):
    e = getattr(model.generation_config, "eos_token_id", None)
    if e is None:
        e = model.config.eos_token_id
    if e is None:
        return []
    return [int(x) for x in (e if isinstance(e, (list, tuple)) else [e])]


# ----------------------------------------------------------------------------------------------
# Training (SPEC section 3, LoRA weights only)
# ----------------------------------------------------------------------------------------------


def train(pm, rows, max_norm, names):
    """make_hf_goldens.train restricted to the trainable (LoRA) parameters: AdamW and clip_grad_norm_ over
    them only. Returns per-step records and the step-1 gradients under adapter-file key names."""
    params = [p for p in pm.parameters() if p.requires_grad]
    named = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    V = pm.get_base_model().config.vocab_size
    if getattr(pm.get_base_model().config, "output_router_logits", False):
        raise NotImplementedError("router aux loss is not handled by the LoRA goldens")
    steps, step1_grads = [], None
    pm.train()
    for s in range(1, MAX_STEPS + 1):
        lr = LR  # constant: no lr_scheduler section
        for g in opt.param_groups:
            g["lr"] = lr
        batch = rows[(s - 1) * GBS : s * GBS]
        mbs = [collate(batch[i : i + LBS]) for i in range(0, GBS, LBS)]
        n_tok = int(sum(int((shift_labels(lab) != -100).sum()) for _, _, lab in mbs))
        loss_total = 0.0
        mb_sums, mb_tokens = [], []
        for ids, mask, lab in mbs:
            logits = pm(input_ids=ids, attention_mask=mask).logits
            tgt = shift_labels(lab)
            ce_sum = F.cross_entropy(logits.float().view(-1, V), tgt.view(-1), ignore_index=-100, reduction="sum")
            (ce_sum / n_tok).backward()
            mb_sums.append(float(ce_sum.detach()))
            mb_tokens.append(int((tgt != -100).sum()))
            loss_total += float(ce_sum.detach()) / n_tok
        if s == 1:
            step1_grads = {}
            for n, p in named:
                step1_grads[names[n]] = (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        gn = torch.nn.utils.clip_grad_norm_(
            params, max_norm if max_norm is not None else float("inf"), foreach=False
        )
        gn = float(gn)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(
            dict(
                step=s,
                loss=loss_total,
                grad_norm=gn,
                lr=lr,
                num_label_tokens=n_tok,
                clipped=bool(max_norm is not None and gn > max_norm),
                micro_batch_ce_sums=mb_sums,
                micro_batch_label_tokens=mb_tokens,
            )
        )
    return steps, step1_grads


# ----------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------


def yaml_list(xs):
    def q(x):
        return f'"{x}"' if any(c in x for c in "*:#[]{},&!|>'\"%@`") else x

    return "[" + ", ".join(q(x) for x in xs) + "]"


def write_recipe(path, case, base_rel, data_rel, peft_targets, notes):
    lines = [
        f"# LoRA golden fixture '{case['name']}': regenerate with tools/make_lora_goldens.py "
        "(see tests/fixtures/lora_golden/README.md).",
        "# Paths are relative to this folder.",
    ]
    lines += [f"# {n}" for n in notes]
    lines += [
        "seed: 42",
        "device: cpu",
        "model:",
        f"  pretrained_model_name_or_path: {base_rel}",
        "  dtype: float32",
        "step_scheduler:",
        f"  global_batch_size: {GBS}",
        f"  local_batch_size: {LBS}",
        f"  max_steps: {MAX_STEPS}",
        "  num_epochs: 1",
        "dataset:",
        "  _target_: tokenized_jsonl",
        f"  path_or_dataset: {data_rel}",
        "dataloader:",
        "  shuffle: false",
        "optimizer:",
        "  _target_: torch.optim.AdamW",
        f"  lr: {fmt_float(LR)}",
        f"  betas: [{fmt_float(BETAS[0])}, {fmt_float(BETAS[1])}]",
        f"  eps: {fmt_float(EPS)}",
        f"  weight_decay: {fmt_float(WD)}",
        "clip_grad_norm:",
        f"  max_norm: {fmt_float(MAX_NORM)}",
        "loss_fn:",
        "  _target_: masked_cross_entropy",
        "peft:",
        f"  target_modules: {yaml_list(peft_targets)}",
        f"  dim: {R}",
        f"  alpha: {ALPHA}",
        "  dropout: 0.0",
        "  dropout_position: pre",
        "  lora_A_init: kaiming",
        "  adapter_path: adapter_init",
        "checkpoint:",
        "  enabled: true",
        "  checkpoint_dir: checkpoints",
        "  save_consolidated: final",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def run_case(case, out_root):
    name = case["name"]
    cdir = os.path.join(out_root, name)
    if os.path.exists(cdir):
        shutil.rmtree(cdir)
    os.makedirs(cdir)
    base_dir = os.path.join(GOLDEN, case["base"], "model")
    data_path = os.path.join(GOLDEN, case["base"], "data.jsonl")
    rows = read_rows(data_path)
    with open(os.path.join(base_dir, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    assert len(rows) >= GBS * MAX_STEPS, f"{data_path}: {len(rows)} rows"
    log(f"== {name} (base {os.path.relpath(base_dir, ROOT)})")

    # 1. base + LoRA (PEFT's init), then non-zero A and B from a seeded generator.
    torch.manual_seed(case["seed"])
    base = load_model(base_dir, "eager")
    requested = sorted(case["lora"].get("target_modules") or [])
    candidates = candidate_linears(base, requested)
    lcfg = make_lora_config(case)
    pm = get_peft_model(base, lcfg)
    # Relative to the repository root (PEFT would write this machine's absolute path).
    pm.peft_config["default"].base_model_name_or_path = os.path.relpath(base_dir, ROOT)
    mods = lora_modules(pm)
    wrapped = {m["name"] for m in mods}
    not_wrapped = [n for n in candidates if n not in wrapped]
    experts_lora = [m["name"] for m in mods if ".experts" in m["name"]]
    log(f"  PEFT wrapped {len(mods)} modules: " + ", ".join(f"{m['name']}({m['cls']})" for m in mods))
    if not_wrapped:
        log(f"  requested Linear modules PEFT did NOT wrap: {not_wrapped}")
    log(f"  expert modules with LoRA: {experts_lora if experts_lora else 'none'}")
    n_init = init_lora_weights(pm, case["seed"] + 11)
    log(f"  initialised {n_init} LoRA tensors")
    ids, mask, lab = first_micro_batch(rows)
    lo_mem = mb_logits(pm, ids, mask)
    init_dir = os.path.join(cdir, "adapter_init")
    adapter_config = save_adapter(pm, init_dir)
    init_shapes = safetensors_shapes(os.path.join(init_dir, "adapter_model.safetensors"))
    converted = sorted(adapter_config.get("target_modules") or []) != requested or sorted(
        adapter_config.get("target_parameters") or []
    ) != sorted(case["lora"].get("target_parameters") or [])
    if converted:
        log(
            "  NOTE: the saved adapter_config differs from the requested LoraConfig: target_modules "
            f"{adapter_config.get('target_modules')}, target_parameters {adapter_config.get('target_parameters')}, "
            f"rank_pattern {adapter_config.get('rank_pattern')}, alpha_pattern {adapter_config.get('alpha_pattern')}"
        )
    del pm, base

    # 2. Fresh base + the saved adapter, trainable: the run starts from exactly what the engine reads.
    base = load_model(base_dir, "eager")
    pm = PeftModel.from_pretrained(base, init_dir, is_trainable=True)
    pm.train()
    lo_init = mb_logits(pm, ids, mask)
    init_reload_diff = max_abs_masked(lo_init, lo_mem, mask)
    log(f"  adapter_init reloaded: max |logits - in-memory| = {init_reload_diff:.3e}")
    names = disk_names(pm)
    trainable = {k for k in names.values()}
    if trainable != set(init_shapes):
        log(
            "  WARNING: trainable parameters vs adapter file keys differ: only trainable "
            f"{sorted(trainable - set(init_shapes))}, only in file {sorted(set(init_shapes) - trainable)}"
        )
    n_frozen_grad = sum(1 for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n)
    if n_frozen_grad:
        log(f"  WARNING: {n_frozen_grad} trainable parameters are not LoRA weights")
    n_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)

    # 3. Train 4 steps.
    steps, grads = train(pm, rows, MAX_NORM, names)
    save_file({k: v.contiguous() for k, v in sorted(grads.items())},
              os.path.join(cdir, "expected_step1_grads.safetensors"))
    final_dir = os.path.join(cdir, "expected_adapter")
    save_adapter(pm, final_dir)
    final_shapes = safetensors_shapes(os.path.join(final_dir, "adapter_model.safetensors"))
    if final_shapes != init_shapes:
        log("  WARNING: expected_adapter keys/shapes differ from adapter_init")
    lo_final = mb_logits(pm, ids, mask)
    save_file(
        {
            "logits": lo_init.contiguous(),
            "logits_final": lo_final.contiguous(),
            "input_ids": ids,
            "attention_mask": mask,
            "labels": lab,
        },
        os.path.join(cdir, "expected_logits.safetensors"),
    )

    # 4. The saved final adapter must reload to the in-memory model's logits; greedy generation from it.
    base2 = load_model(base_dir, "eager")
    pm2 = PeftModel.from_pretrained(base2, final_dir)
    lo_reload = mb_logits(pm2, ids, mask)
    final_reload_diff = max_abs_masked(lo_reload, lo_final, mask)
    log(f"  expected_adapter reloaded: max |logits - in-memory trained| = {final_reload_diff:.3e}")
    eos = eos_ids(pm2.get_base_model())
    # A second prompt: the first GEN_EXTRA_LEN tokens of data row 0 (a tiny random model may just repeat the
    # fixed prompt's last token).
    extra_prompt = [int(t) for t in rows[0]["input_ids"][:GEN_EXTRA_LEN]]
    gen_adapter, gm_adapter = greedy(pm2, GEN_PROMPT, GEN_NEW_TOKENS, eos)
    gen_adapter2, gm_adapter2 = greedy(pm2, extra_prompt, GEN_NEW_TOKENS, eos)
    del pm2, base2

    # 5. Merged model (merge_and_unload of the trained model) vs base alone: greedy generation.
    merged = pm.merge_and_unload()
    merged.eval()
    lo_merged = mb_logits(merged, ids, mask)
    merged_diff = max_abs_masked(lo_merged, lo_final, mask)
    log(f"  merged: max |logits - unmerged trained| = {merged_diff:.3e}")
    gen_merged, gm_merged = greedy(merged, GEN_PROMPT, GEN_NEW_TOKENS, eos)
    gen_merged2, gm_merged2 = greedy(merged, extra_prompt, GEN_NEW_TOKENS, eos)
    del merged, pm
    plain = load_model(base_dir, "eager")
    gen_base, gm_base = greedy(plain, GEN_PROMPT, GEN_NEW_TOKENS, eos)
    gen_base2, gm_base2 = greedy(plain, extra_prompt, GEN_NEW_TOKENS, eos)
    del plain
    log(f"  generate {GEN_PROMPT}: base {gen_base}, merged {gen_merged}, adapter {gen_adapter}")
    log(f"  generate {extra_prompt}: base {gen_base2}, merged {gen_merged2}, adapter {gen_adapter2}")
    if gen_merged != gen_adapter or gen_merged2 != gen_adapter2:
        log("  NOTE: merged and unmerged generations differ (near-tie? see the top-2 margins)")
    if gen_merged == gen_base and gen_merged2 == gen_base2:
        log("  NOTE: the merged model generates what the base does for both prompts")

    # 6. Recipe + expected.json
    # Relative to the fixture's home tests/fixtures/lora_golden/<case>/ whatever --out was (the generated
    # folder is meant to be copied there).
    home = os.path.join(ROOT, "tests", "fixtures", "lora_golden", name)
    base_rel = os.path.relpath(base_dir, home)
    data_rel = os.path.relpath(data_path, home)
    notes = []
    if case.get("provisional"):
        recipe_targets = list(case["lora"]["target_modules"]) + ["*.experts"]
        notes += [
            "PROVISIONAL: the run used HF PEFT `target_parameters` "
            f"{case['lora']['target_parameters']} (lora.ParamWrapper on the fused 3-D expert weights);",
            "'*.experts' stands for that here. See expected.json lora_modules / adapter_keys for the layout.",
        ]
    else:
        recipe_targets = list(case["lora"]["target_modules"])
    if converted:
        notes += [
            f"NOTE: PEFT {peft.__version__} with transformers {transformers.__version__} rewrote the LoraConfig "
            "before injecting it; adapter_init/adapter_config.json holds:",
            f"  target_modules {sorted(adapter_config.get('target_modules') or [])}, target_parameters "
            f"{sorted(adapter_config.get('target_parameters') or [])},",
            f"  rank_pattern {adapter_config.get('rank_pattern')}, alpha_pattern {adapter_config.get('alpha_pattern')}",
        ]
    if not_wrapped:
        notes += [f"NOTE: PEFT did not wrap these requested Linear modules: {not_wrapped}"]
    write_recipe(os.path.join(cdir, "recipe.yaml"), case, base_rel, data_rel, recipe_targets, notes)

    expected = dict(
        case=name,
        base_model=os.path.relpath(base_dir, ROOT),
        data=os.path.relpath(data_path, ROOT),
        model_type=model_type,
        lora_config_requested=dict(
            r=R,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            init_lora_weights=True,
            task_type="CAUSAL_LM",
            **case["lora"],
        ),
        adapter_config=adapter_config,
        peft_config_converted=converted,
        lora_modules=mods,
        requested_linear_modules_not_wrapped=not_wrapped,
        experts_with_lora=experts_lora,
        init=dict(
            seed=case["seed"] + 11,
            lora_A="U(-1/sqrt(in), 1/sqrt(in)), in = lora_A.shape[1]",
            lora_B=f"N(0, {B_STD})",
            order="PeftModel.named_parameters() order, one torch.Generator (rand for A, randn for B)",
        ),
        adapter_keys=init_shapes,
        trainable_parameters=n_trainable,
        steps=steps,
        max_norm=MAX_NORM,
        lr_scheduler=None,
        attn_implementation="eager",
        initial_reload_max_abs_logit_diff=init_reload_diff,
        final_reload_max_abs_logit_diff=final_reload_diff,
        merged_max_abs_logit_diff=merged_diff,
        generate_prompt=GEN_PROMPT,
        generate_max_new_tokens=GEN_NEW_TOKENS,
        generate_eos_token_ids=eos,
        generate_base=gen_base,
        generate_merged=gen_merged,
        generate_adapter=gen_adapter,
        generate_base_top2_margins=gm_base,
        generate_merged_top2_margins=gm_merged,
        generate_adapter_top2_margins=gm_adapter,
        generate_extra=dict(
            prompt=extra_prompt,
            prompt_source=f"data.jsonl row 0, first {GEN_EXTRA_LEN} input_ids",
            base=gen_base2,
            merged=gen_merged2,
            adapter=gen_adapter2,
            base_top2_margins=gm_base2,
            merged_top2_margins=gm_merged2,
            adapter_top2_margins=gm_adapter2,
        ),
        provisional=bool(case.get("provisional")),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
    )
    if any("parameter_name" in m for m in mods):
        expected["param_wrapper_layout"] = (
            "PEFT lora.ParamWrapper on a 3-D parameter [E, out, in] (transformers 5 layout, is_transposed false): "
            "lora_A.weight [r*E, in], row e*r+k; lora_B.weight [out, r*E], column k*E+e; "
            "delta[e] = scaling * sum_k B[:, k*E+e] (x) A[e*r+k, :]  (einsum 'o r e, e r i -> e o i' of "
            "B.reshape(out, r, E) and A.reshape(E, r, in)); scaling = lora_alpha / r with the per-expert r. "
            "Two parameters of one module nest: the first wrapped (sorted target names, then parameter order) is "
            "the inner module (<experts>.base_layer), the next the outer (<experts>); see lora_modules."
        )
    with open(os.path.join(cdir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2, default=json_default)
        f.write("\n")
    return expected


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "lora_golden"))
    ap.add_argument("--cases", default="", help="comma-separated subset of case names")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    out_root = os.path.abspath(args.out)
    os.makedirs(out_root, exist_ok=True)
    want = [c for c in args.cases.split(",") if c]
    unknown = [w for w in want if w not in {c["name"] for c in CASES}]
    if unknown:
        ap.error(f"unknown cases {unknown}")
    cases = [c for c in CASES if not want or c["name"] in want]
    log(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"threads {torch.get_num_threads()}"
    )

    results, failed = [], []
    for case in cases:
        try:
            results.append(run_case(case, out_root))
        except Exception:  # noqa: BLE001 - keep going so one bad case does not lose the others
            import traceback

            traceback.print_exc()
            failed.append(case["name"])
    with open(os.path.join(out_root, "index.json"), "w") as f:
        json.dump(
            dict(
                cases=[r["case"] for r in results],
                failed=failed,
                torch=torch.__version__,
                transformers=transformers.__version__,
                peft=peft.__version__,
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
    log("\ncase               lora modules  experts w/ LoRA  converted  reload diff (init/final)  merged diff")
    for r in results:
        log(
            f"{r['case']:<18} {len(r['lora_modules']):>12}  {len(r['experts_with_lora']):>15}  "
            f"{'yes' if r['peft_config_converted'] else 'no':>9}  "
            f"{r['initial_reload_max_abs_logit_diff']:.2e} / {r['final_reload_max_abs_logit_diff']:.2e}  "
            f"{r['merged_max_abs_logit_diff']:.2e}"
        )
    if failed:
        log(f"FAILED cases: {failed}")
        sys.exit(1)


if __name__ == "__main__":
    main()
