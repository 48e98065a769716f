#!/usr/bin/env python3
"""Per-kernel time table from an Nsight Compute CSV (ncu --csv --metrics gpu__time_duration.sum ...):
   python3 tools/ncu_kernel_summary.py NCU.csv STEPS [TOP]
Groups the kernels by name, sums gpu__time_duration, divides by STEPS (the training steps the profiled run made)
and prints ms per step, share, launches per step and mean us per launch, longest first. ncu serialises and
replays every kernel, so these are isolated kernel times: their sum is the step's GPU busy time without overlap
or launch gaps (compare it with the bench's step_ms to see the host/launch share)."""
import csv
import sys
from collections import defaultdict

path, steps = sys.argv[1], float(sys.argv[2])
top = int(sys.argv[3]) if len(sys.argv) > 3 else 30
rows = list(csv.reader(line for line in open(path, errors="replace") if line.startswith('"')))
head = rows[0]
ki, mi, vi = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
unit_i = head.index("Metric Unit") if "Metric Unit" in head else None
tot = defaultdict(float)
cnt = defaultdict(int)
for r in rows[1:]:
    if len(r) <= max(ki, mi, vi) or r[mi] != "gpu__time_duration.sum":
        continue
    v = float(r[vi].replace(",", ""))
    unit = r[unit_i] if unit_i is not None else "ns"
    v *= {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}.get(unit, 1e-6)
    name = r[ki]
    name = name[: name.find("(")] if "(" in name else name
    tot[name] += v
    cnt[name] += 1
all_ms = sum(tot.values()) / steps
print(f"kernels: {sum(cnt.values())} launches, {len(tot)} names; GPU busy {all_ms:.2f} ms per step (isolated kernel times)")
print(f"{'ms/step':>8} {'share':>6} {'calls/step':>10} {'us/call':>8}  kernel")
for name, v in sorted(tot.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{v / steps:8.3f} {100 * v / steps / all_ms:5.1f}% {cnt[name] / steps:10.1f} {1000 * v / cnt[name]:8.1f}  {name[:110]}")
