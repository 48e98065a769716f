# Reference timings for bench_attention.cu: PyTorch SDPA on the same shapes (W1, W2; causal, GQA), each
# backend that accepts them (FlashAttention-2 via torch, cuDNN fused attention, efficient). CUDA events, median.
# Prints the same TFLOP/s count as the C++ bench (forward 4 B nh T^2 D / 2, backward 2.5 x).
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, warm=5, reps=20):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    shapes = [("W1", 4, 2048, 32, 8, 64), ("W2", 1, 4096, 32, 4, 128)]
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    print(f"{'shape':5} {'backend':10} {'fwd ms':>8} {'fwd TF/s':>9} {'bwd ms':>8} {'bwd TF/s':>9}")
    for name, B, T, nh, nkv, D in shapes:
        fl = 4.0 * B * nh * T * T * D / 2
        q = torch.randn(B, nh, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, nkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, nkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, nh, T, D, device="cuda", dtype=torch.bfloat16)
        for bname, be in backends:
            try:
                with sdpa_kernel([be]):
                    try:  # native GQA
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                        leaves = (q, k, v)
                        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    except Exception:  # backend without GQA: expanded k/v (extra memory, same FLOPs)
                        kk = k.detach().repeat_interleave(nh // nkv, dim=1).requires_grad_()
                        vv = v.detach().repeat_interleave(nh // nkv, dim=1).requires_grad_()
                        F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
                        leaves = (q, kk, vv)
                        fwd = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
                        bname += "(rep)"
                    tf = median_ms(fwd, reps=reps)
                    o = fwd()
                    tb = median_ms(lambda: torch.autograd.grad(o, leaves, g, retain_graph=True), reps=reps)
                print(f"{name:5} {bname:10} {tf:8.3f} {fl / tf / 1e9:9.1f} {tb:8.3f} {2.5 * fl / tb / 1e9:9.1f}")
            except Exception as e:  # backend refuses the shape / not built
                print(f"{name:5} {bname:10} unavailable: {str(e).splitlines()[0][:80]}")


if __name__ == "__main__":
    main()
