#!/usr/bin/env python3
"""Golden files for the NF4/FP4 (bitsandbytes 4-bit) code: tests/unit/test_nf4.cpp reads them.

Runs where torch and bitsandbytes are importable and a CUDA device is visible: bitsandbytes' CUDA kernels
are what produced the checkpoints we must read (its CPU fallback differs, e.g. an all-zero block gets
code 7 there and code 0 on CUDA), so the goldens come from CUDA only. Without bitsandbytes or a GPU it
prints what is missing and exits 0 (the C++ golden test then skips).

For each case it writes tests/fixtures/nf4/<case>.safetensors holding
  input                         the tensor given to bnb.functional.quantize_4bit (fp32 or bf16)
  w.weight, w.weight.*          exactly what bitsandbytes' Linear4bit saves (QuantState.as_dict(packed=True)):
                                packed uint8 [(n+1)/2, 1], absmax (fp32, or uint8 codes when nested),
                                quant_map fp32[16], nested_absmax, nested_quant_map fp32[256], and
                                quant_state.bitsandbytes__<nf4|fp4> (uint8 JSON)
  absmax_f32                    the per-block absmax as dequantize_4bit uses it (nested: dequantised + offset)
  dequant_f32, dequant_bf16     bnb.functional.dequantize_4bit with the state's dtype set to each
  unnested_absmax               (nested cases) the fp32 absmax before double quantisation, i.e. the absmax
                                of quantize_4bit(compress_statistics=False) on the same input
plus metadata (versions, device, torch CPU capability, the case's options). Also writes dynamic_map.safetensors
with create_dynamic_map(signed=True) as this torch built it.

Usage (on the GPU machine; bitsandbytes may be a source checkout with its CUDA library built):
  PYTHONPATH=/path/to/bitsandbytes python3 tools/make_nf4_golden.py [--out DIR] [--big DIR]
--big DIR additionally writes large raw cases (not committed) for a bulk comparison: DIR/<case>.{in,packed,
absmax,nested_codes,nested_absmax,meta} (see the --big section below).
"""
import argparse
import json
import os
import sys


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "nf4"))
    ap.add_argument("--big", default=None, help="also write large raw cases here (bulk comparison)")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("make_nf4_golden: torch is not installed; nothing written")
        return 0
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception as e:  # ImportError, or the native library failing to load
        print(f"make_nf4_golden: bitsandbytes is not usable here ({type(e).__name__}: {e}); nothing written")
        return 0
    if not torch.cuda.is_available():
        print("make_nf4_golden: no CUDA device; bitsandbytes' CUDA kernels are the reference; nothing written")
        return 0
    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    dev = "cuda"
    meta_common = {
        "torch": torch.__version__,
        "bitsandbytes": getattr(bnb, "__version__", "?"),
        "device": torch.cuda.get_device_name(0),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }

    def quantize(x, quant_type, blocksize, nested):
        packed, state = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        return packed, state

    def dequant(packed, state, dtype):
        import copy

        s = copy.copy(state)
        s.dtype = dtype
        return F.dequantize_4bit(packed, s)

    def absmax_f32(state):
        if state.nested:
            a = F.dequantize_blockwise(state.absmax, state.state2)
            a += state.offset
            return a.float()
        return state.absmax.float()

    def write_case(name, x, quant_type="nf4", blocksize=64, nested=False):
        x = x.contiguous().to(dev)
        packed, state = quantize(x, quant_type, blocksize, nested)
        t = {"input": x.cpu().contiguous()}
        for k, v in state.as_dict(packed=True).items():
            t["w.weight." + k] = v.detach().cpu().contiguous()
        t["w.weight"] = packed.cpu().contiguous()
        t["absmax_f32"] = absmax_f32(state).cpu().contiguous()
        t["dequant_f32"] = dequant(packed, state, torch.float32).cpu().contiguous()
        t["dequant_bf16"] = dequant(packed, state, torch.bfloat16).cpu().contiguous()
        if nested:
            _, plain = quantize(x, quant_type, blocksize, False)
            t["unnested_absmax"] = plain.absmax.float().cpu().contiguous()
        meta = dict(meta_common, case=name, quant_type=quant_type, blocksize=str(blocksize), nested=str(nested))
        meta = {k: str(v) for k, v in meta.items()}
        path = os.path.join(args.out, name + ".safetensors")
        save_file(t, path, metadata=meta)
        print(f"wrote {path}: input {tuple(x.shape)} {x.dtype}, {quant_type}, blocksize {blocksize}, nested {nested}")

    g = torch.Generator().manual_seed(1234)

    def randn(*shape, scale=0.02, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    # Plain random weights, fp32 and bf16, with and without double quantisation. 640 blocks -> 3 nested
    # blocks of 256, the last one partial.
    write_case("random_f32", randn(64, 96))
    write_case("random_f32_nested", randn(64, 96), nested=True)
    write_case("random_bf16_nested", randn(128, 320, dtype=torch.bfloat16), nested=True)
    write_case("random_bf16_bs128_nested", randn(96, 256, dtype=torch.bfloat16), blocksize=128, nested=True)

    # Edge cases, one 64-element block per row (absmax 1.0 unless said otherwise).
    nf4 = F.get_4bit_type("nf4", device="cpu").float()
    # the decision thresholds as dQuantizeNF4 has them (float literals)
    thr = torch.tensor([-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
                        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
                        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
                        0.5016634166240692, 0.6427869200706482, 0.8614784181118011], dtype=torch.float32)
    def pad64(t):
        return torch.cat([t, torch.zeros(64)])[:64]

    rows = []
    rows.append(torch.zeros(64))                                         # all-zero block
    rows.append(torch.cat([nf4, nf4.flip(0), nf4 * 0.5, -nf4]))         # exact code values (absmax 1)
    rows.append(pad64(torch.cat([thr, torch.tensor([1.0]), thr, -thr, torch.tensor([-1.0, 0.0, -0.0, 1.0])])))  # ties
    up = torch.nextafter(thr, torch.tensor(2.0))
    dn = torch.nextafter(thr, torch.tensor(-2.0))
    rows.append(pad64(torch.cat([up, dn, torch.tensor([1.0, -1.0]), up, dn])))  # one ulp either side
    rows.append(pad64(torch.cat([thr * 4, torch.tensor([-4.0]), -thr * 4, torch.tensor([0.25, 3.0, 2.0, 4.0])])))  # absmax 4
    rows.append(randn(64, scale=3.0))                                   # |x| > 1
    r6 = randn(64, scale=1e-30)
    r6[5] = 1e-40                                                        # subnormal input
    rows.append(r6)
    r7 = randn(64, scale=0.01)
    r7[17] = 50.0                                                        # one outlier
    rows.append(r7)
    edge = torch.stack(rows).float()
    write_case("edge_f32", edge)
    write_case("edge_f32_nested", edge, nested=True)
    write_case("edge_bf16", edge.to(torch.bfloat16))

    # A 1-D tensor with an odd number of elements: partial last block, padded last byte.
    write_case("odd_f32_nested", randn(1001), nested=True)
    # All absmax equal (nested absmax - offset == 0 everywhere).
    write_case("const_absmax_nested", torch.ones(4, 64) * 0.5, nested=True)
    # FP4
    write_case("fp4_f32", randn(32, 64))
    write_case("fp4_bf16_nested", randn(64, 64, dtype=torch.bfloat16), nested=True, quant_type="fp4")

    save_file({"dynamic_map": F.create_dynamic_map(signed=True).float().contiguous()},
              os.path.join(args.out, "dynamic_map.safetensors"), metadata={k: str(v) for k, v in meta_common.items()})
    print("wrote dynamic_map.safetensors")

    if args.big:
        # Raw little-endian files for a bulk comparison against the C++ reference (not committed):
        # <case>.in (fp32 or bf16 bits), .packed (uint8), .absmax (fp32, plain quantisation), .nested_codes
        # (uint8), .nested_absmax (fp32), .meta (JSON: n, dtype, blocksize, offset).
        os.makedirs(args.big, exist_ok=True)
        F.create_dynamic_map(signed=True).float().numpy().tofile(os.path.join(args.big, "dynamic_map.bin"))
        for name, dtype, n, scale in [("big_f32", torch.float32, 1 << 24, 0.02), ("big_bf16", torch.bfloat16, 1 << 24, 1.0)]:
            x = (torch.randn(n, generator=g) * scale).to(dtype).to(dev)
            packed, plain = quantize(x, "nf4", 64, False)
            _, nest = quantize(x, "nf4", 64, True)
            base = os.path.join(args.big, name)
            x.cpu().contiguous().view(torch.uint8).numpy().tofile(base + ".in")
            packed.cpu().numpy().tofile(base + ".packed")
            plain.absmax.cpu().numpy().tofile(base + ".absmax")
            nest.absmax.cpu().numpy().tofile(base + ".nested_codes")
            nest.state2.absmax.cpu().numpy().tofile(base + ".nested_absmax")
            with open(base + ".meta", "w") as f:
                json.dump({"n": n, "dtype": str(dtype).replace("torch.", ""), "blocksize": 64,
                           "offset": nest.offset.item()}, f)
            print(f"wrote {base}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
