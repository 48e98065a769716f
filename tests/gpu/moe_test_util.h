// Shared by the MoE GPU tests (test_cuda_moe.cpp, test_cuda_moe_grouped_gemm.cpp): fast uniform host inputs,
// random integers, per-expert row counts, and the expert path of a MoE block (forward and backward through the ops::
// front-ends) run on either side and compared. Header-only; everything in am::moe_test, which also re-exports the am
// types and the gpu_test helpers both use: a test file says `using namespace am::moe_test;`.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "../common/tolerance.h"
#include "backend/cuda/cuda_ops.h"
#include "core/tensor.h"
#include "gpu_test_util.h"
#include "ops/moe_ops.h"
#include "ops/ops.h"

namespace am::moe_test {

using am::DType;
using am::Shape;
using am::Tensor;
using gpu_test::down;
using gpu_test::expect_close;
using gpu_test::expect_close_dt;
using gpu_test::poisoned;
using gpu_test::up;

// Uniform in [lo, hi) from a splitmix64 stream seeded by rng (fast enough for the W2 expert weights, 4e8 values),
// rounded to dt (the values stay fp32).
inline Tensor rand_host(const Shape& s, std::mt19937& rng, DType dt = DType::F32, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::empty(s, DType::F32);
  uint64_t state = (static_cast<uint64_t>(rng()) << 32) ^ rng();
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    p[i] = lo + (hi - lo) * static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
  }
  if (dt != DType::F32) t = t.to(dt).to(DType::F32);
  return t;
}

// Uniform integer in [lo, hi].
inline int64_t rint(std::mt19937& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// Rows per expert of top-k ids idx (int32, host).
inline std::vector<int64_t> counts_of(const Tensor& idx, int64_t e) {
  std::vector<int64_t> c(static_cast<size_t>(e), 0);
  for (int64_t i = 0; i < idx.numel(); ++i) ++c[static_cast<size_t>(idx.data<int32_t>()[i])];
  return c;
}

// The expert path of a MoE block through the ops:: front-ends, on x's device and in x's dtype (dW in fp32): gather,
// gate_up, SwiGLU, down, combine with the top-k weights tw, then the backward of all of it from dy, dW accumulated
// into zeros. off / perm / inv: the dispatch plan; counts: the host counts the grouped products get (nullptr: none).
struct ExpertPath {
  Tensor y, dtw, dwd, dwgu, dx;
};
inline ExpertPath run_expert_path(const Tensor& x, const Tensor& wgu, const Tensor& wd, const Tensor& dy,
                                  const Tensor& off, const Tensor& perm, const Tensor& inv, const Tensor& tw, int64_t k,
                                  const std::vector<int64_t>* counts) {
  const bool dev = x.device() == DeviceType::CUDA;
  const DType dt = x.dtype();
  const int64_t n = x.shape()[0], h = x.shape()[1], e = wgu.shape()[0], inner = wd.shape()[2];
  auto empty = [&](const Shape& s, DType d) { return dev ? cuda::empty(s, d) : Tensor::empty(s, d); };
  Tensor xg = empty({n * k, h}, dt), gu = empty({n * k, 2 * inner}, dt), hh = empty({n * k, inner}, dt),
         yg = empty({n * k, h}, dt);
  ExpertPath r;
  r.y = empty({n, h}, dt);
  ops::moe_gather(x, perm, k, xg);
  ops::grouped_linear_fwd(xg, wgu, off, gu, counts);
  ops::swiglu_fused_fwd(gu, hh);
  ops::grouped_linear_fwd(hh, wd, off, yg, counts);
  ops::moe_combine(yg, inv, tw, r.y);
  Tensor dyg = empty({n * k, h}, dt), dh = empty({n * k, inner}, dt), dgu = empty({n * k, 2 * inner}, dt),
         dxg = empty({n * k, h}, dt);
  r.dtw = empty({n, k}, DType::F32);
  r.dx = empty({n, h}, dt);
  if (dev) {
    r.dwgu = cuda::empty({e, 2 * inner, h}, DType::F32);
    r.dwd = cuda::empty({e, h, inner}, DType::F32);
    cuda::zero_(r.dwgu);
    cuda::zero_(r.dwd);
  } else {
    r.dwgu = Tensor::zeros({e, 2 * inner, h}, DType::F32);
    r.dwd = Tensor::zeros({e, h, inner}, DType::F32);
  }
  ops::moe_combine_bwd(yg, inv, tw, dy, dyg, r.dtw);
  ops::grouped_linear_bwd(hh, wd, off, dyg, &dh, r.dwd, counts);
  ops::swiglu_fused_bwd(gu, dh, dgu);
  ops::grouped_linear_bwd(xg, wgu, off, dgu, &dxg, r.dwgu, counts);
  ops::moe_gather_bwd(dxg, inv, k, r.dx);
  return r;
}

// The device's expert path against the host's: bf16 intermediates on the device, a few bf16 roundings deep.
inline void expect_expert_path_close(const ExpertPath& got, const ExpertPath& want) {
  expect_close(got.y, want.y, test::Tolerance{3e-2, 3e-2}, 2e-2, "block y");
  expect_close(got.dtw, want.dtw, test::Tolerance{3e-2, 3e-2}, 2e-2, "block dtopk_w");
  expect_close(got.dwd, want.dwd, test::Tolerance{3e-2, 3e-2}, 2e-2, "block dW_down");
  expect_close(got.dwgu, want.dwgu, test::Tolerance{3e-2, 3e-2}, 2e-2, "block dW_gate_up");
  expect_close(got.dx, want.dx, test::Tolerance{3e-2, 3e-2}, 2e-2, "block dx (expert path)");
}

}  // namespace am::moe_test
