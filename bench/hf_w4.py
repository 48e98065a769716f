"""HF side of BENCH.md W4 (the seed tutorial end to end), run by bench/w4.sh in the same device call as the engine:
HF `Trainer(bf16=True)` (fp32 parameters + bf16 autocast) with dynamic padding, on the SAME tokenised samples the
engine trains on (`automodel dataset` wrote them: DATA/train.jsonl, DATA/validation.jsonl), with the recipe's
settings (llama3_2_1b_squad.yaml): global batch 64 = 8 x 8 accumulation, Adam lr 1e-5 (AdamW with weight decay 0),
cosine to min_lr 1e-6, clip 1.0, one epoch in file order (the recipe's shuffle: false), validation every 10 steps on
the 64 validation samples, no checkpoints (the engine's side runs with checkpoint.enabled=false too).
Usage: python3 bench/hf_w4.py DATA_DIR CONFIG.json     (wall time is measured around it by bench/w4.sh)
Prints one JSON line: train_runtime_s, real tokens, tokens_per_s over the train runtime, peak_mem_gib, final loss."""
import json
import sys
import time

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

data_dir, cfg_path = sys.argv[1], sys.argv[2]


class Jsonl(Dataset):
    def __init__(self, path):
        self.rows = [json.loads(line) for line in open(path)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows):
    # Dynamic padding to the longest row of the micro-batch, right side; padded labels are -100.
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    lab = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        lab[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


class InOrder(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


train, val = Jsonl(f"{data_dir}/train.jsonl"), Jsonl(f"{data_dir}/validation.jsonl")
tokens = sum(sum(1 for _ in r["input_ids"]) for r in train.rows)
torch.manual_seed(1111)
cfg = AutoConfig.from_pretrained(cfg_path)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
args = TrainingArguments(
    output_dir="/tmp/hf_w4", per_device_train_batch_size=8, gradient_accumulation_steps=8, per_device_eval_batch_size=8,
    learning_rate=1e-5, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
    lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-6}, warmup_steps=0, max_grad_norm=1.0,
    num_train_epochs=1, bf16=True, logging_steps=10, eval_strategy="steps", eval_steps=10, save_strategy="no",
    report_to="none", remove_unused_columns=False, dataloader_num_workers=0, seed=1111, optim="adamw_torch_fused")
trainer = InOrder(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=collate)
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
out = trainer.train()
torch.cuda.synchronize()
rt = time.perf_counter() - t0
print(json.dumps({"side": "hf", "train_runtime_s": rt, "tokens": tokens, "tokens_per_s": tokens / rt,
                  "steps": out.global_step, "loss": out.training_loss,
                  "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "gpu": torch.cuda.get_device_name()}),
      flush=True)
