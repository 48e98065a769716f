#!/usr/bin/env python3
"""Check that TensorBoard itself reads our event files with the numbers in training.jsonl.

tools/read_tb_events.py is our own standard-library reader, used by CI; this one uses the `tensorboard`
package's EventAccumulator (the code `tensorboard --logdir` runs), so it checks the files against the real
consumer. It needs `tensorboard` installed (the GPU machine has it).

Usage: tb_readback_check.py LOG_DIR RUN_DIR   (RUN_DIR holds training.jsonl [and validation.jsonl])
Prints one line per tag ("tag: N steps, max |tb - jsonl| = x") and exits 1 on any mismatch.
"""
import json
import os
import struct
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = {  # tensorboard tag -> training.jsonl key
    "train/loss": "loss",
    "train/grad_norm": "grad_norm",
    "train/lr": "lr",
    "train/tokens_per_s": "tps",
    "train/mem_gib": "mem_gib",
}


def f32(x):
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def main():
    log_dir, run_dir = sys.argv[1], sys.argv[2]
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    print("tensorboard scalar tags:", " ".join(sorted(have)))
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "training.jsonl")) if l.strip()]
    train = [r for r in rows if "loss" in r]
    bad = 0
    for tag, key in TAGS.items():
        want = {r["step"]: f32(r[key]) for r in train if key in r}
        if not want:
            continue
        if tag not in have:
            print(f"{tag}: MISSING from the event files")
            bad += 1
            continue
        got = {e.step: e.value for e in acc.Scalars(tag)}
        missing = sorted(set(want) - set(got))
        diff = max((abs(got[s] - v) for s, v in want.items() if s in got), default=0.0)
        ok = not missing and diff == 0.0
        bad += not ok
        print(f"{tag}: {len(got)} steps, max |tb - jsonl| = {diff:g}{'' if not missing else f', steps missing {missing}'}"
              f" {'ok' if ok else 'MISMATCH'}")
    vpath = os.path.join(run_dir, "validation.jsonl")
    vals = [json.loads(l) for l in open(vpath) if l.strip()] if os.path.exists(vpath) else []
    if vals:
        got = {e.step: e.value for e in acc.Scalars("val/loss")} if "val/loss" in have else {}
        diff = max((abs(got.get(r["step"], float("inf")) - f32(r["val_loss"])) for r in vals), default=0.0)
        bad += diff != 0.0
        print(f"val/loss: {len(got)} points, max |tb - jsonl| = {diff:g} {'ok' if diff == 0.0 else 'MISMATCH'}")
    print("tensorboard readback", "OK" if bad == 0 else f"FAILED ({bad} tags)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
