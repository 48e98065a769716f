// Nemotron-H on CUDA against the CPU reference (docs/nemotron_h.md):
//   ops     every Mamba2 op of src/ops/mamba2_ops.h on the device (src/backend/cuda/mamba2.cu) vs the CPU kernels
//           on host fp32 copies of the same inputs (rounded to bf16 first when the device runs bf16): the causal
//           depthwise conv1d + SiLU forward / backward, the selective scan forward (and its optional per-step
//           states) / backward (which recomputes the states: dx, ddt, dB, dC assigned; dA, dD +=), the grouped gated
//           RMSNorm, the dt chain (softplus + clamp on both sides of the clamp), A = -exp(A_log), relu2. Random
//           shapes including head dims / state sizes that are not multiples of the warp layout, several heads per
//           group, packed rows (segment resets and -1 padding), fp32 and bf16.
//   model   the tiny fixture tests/fixtures/ref_torch/nemotron_h (pattern M E * - M: Mamba2, relu2 MoE with the grouped
//           sigmoid router, NoPE attention, relu2 MLP) trained for its 4 AdamW steps on CUDA (bf16 activations) and on
//           the CPU (fp32): per-step loss within 1%, grad norm within 5%; also with activation checkpointing and with
//           a bf16 residual stream; and forward_logits of a packed row on the device vs the host.
// Outputs are poisoned with NaN before each op call; parameter gradients start from random values (+= contract).
// Runs only where a CUDA device is visible (GTEST_SKIP otherwise). Not run yet: written on a machine without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../common/tolerance.h"
#include "gpu_test_util.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/mamba2.h"
#include "config/recipe.h"
#include "core/error.h"
#include "core/tensor.h"
#include "data/dataset.h"
#include "io/model_config.h"
#include "models/hf_weights.h"
#include "models/model.h"
#include "ops/mamba2_ops.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace am;
namespace cu = am::cuda;

namespace {

using gpu_test::down;
using gpu_test::expect_close;
using gpu_test::expect_close_dt;
using gpu_test::kNaN;
using gpu_test::poisoned;
using gpu_test::rand_host;
using gpu_test::up;
#define REQUIRE_DEVICE() AM_REQUIRE_DEVICE()

const DType kDtypes[] = {DType::F32, DType::BF16};

Tensor host_copy(const Tensor& t) {
  Tensor c = Tensor::empty(t.shape(), t.dtype());
  std::copy(static_cast<const char*>(t.raw()), static_cast<const char*>(t.raw()) + t.nbytes(), static_cast<char*>(c.raw()));
  return c;
}
const char* dname(DType d) { return dtype_name(d); }
int64_t rint(std::mt19937& rng, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }


// Packed rows: segments of random lengths with ids 0, 1, 2, ... and (sometimes) a tail of -1 padding.
Tensor packed_segments(int64_t B, int64_t T, std::mt19937& rng) {
  Tensor s = Tensor::empty({B, T}, DType::I32);
  for (int64_t b = 0; b < B; ++b) {
    int64_t t = 0, id = 0;
    const int64_t pad = rng() % 2 ? rint(rng, 0, T / 4) : 0;
    while (t < T - pad) {
      const int64_t len = std::min(T - pad - t, rint(rng, 1, std::max<int64_t>(2, T / 3)));
      for (int64_t i = 0; i < len; ++i) s.data<int32_t>()[b * T + t + i] = static_cast<int32_t>(id);
      t += len;
      ++id;
    }
    for (; t < T; ++t) s.data<int32_t>()[b * T + t] = -1;
  }
  return s;
}

// =============================================================================================== conv1d + SiLU

TEST(CudaMamba2Ops, ConvMatchesCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(11);
  struct Case {
    int64_t B, T, C, K;
    bool bias, packed;
  };
  const Case cases[] = {{1, 1, 3, 4, true, false},  {2, 9, 5, 4, true, true},   {3, 33, 70, 3, false, true},
                        {1, 64, 96, 4, true, false}, {2, 40, 131, 2, true, true}, {1, 17, 8, 8, false, true}};
  for (DType dt : kDtypes)
    for (const Case& c : cases) {
      const std::string what = std::string(dname(dt)) + " B" + std::to_string(c.B) + " T" + std::to_string(c.T) + " C" +
                               std::to_string(c.C) + " K" + std::to_string(c.K) + (c.packed ? " packed" : "");
      Tensor x = rand_host({c.B, c.T, c.C}, rng, dt, -2.f, 2.f), w = rand_host({c.C, 1, c.K}, rng, DType::F32, -0.6f, 0.6f),
             bias = rand_host({c.C}, rng, DType::F32, -0.3f, 0.3f), dy = rand_host({c.B, c.T, c.C}, rng, dt);
      Tensor seg = packed_segments(c.B, c.T, rng);
      const Tensor* hseg = c.packed ? &seg : nullptr;
      Tensor gseg = cu::to_device(seg);
      const Tensor* dseg = c.packed ? &gseg : nullptr;
      // forward
      Tensor pre = Tensor::empty(x.shape(), DType::F32), y = Tensor::empty(x.shape(), DType::F32);
      ops::mamba_conv1d_silu_fwd(x, w, c.bias ? &bias : nullptr, hseg, pre, y);
      Tensor dw_ = up(w, DType::F32), db_ = up(bias, DType::F32);
      Tensor gpre = poisoned(x.shape(), dt), gy = poisoned(x.shape(), dt);
      ops::mamba_conv1d_silu_fwd(up(x, dt), dw_, c.bias ? &db_ : nullptr, dseg, gpre, gy);
      expect_close_dt(gpre, pre, dt, "conv fwd pre " + what);
      expect_close_dt(gy, y, dt, "conv fwd y " + what);
      // backward from the same (device-rounded) pre
      Tensor pre_r = dt == DType::F32 ? pre : pre.to(dt).to(DType::F32);
      Tensor dx = Tensor::empty(x.shape(), DType::F32), gw0 = rand_host({c.C, 1, c.K}, rng), gb0 = rand_host({c.C}, rng);
      Tensor hw = host_copy(gw0), hb = host_copy(gb0);
      ops::mamba_conv1d_silu_bwd(x, w, pre_r, hseg, dy, dx, &hw, c.bias ? &hb : nullptr);
      Tensor gdx = poisoned(x.shape(), dt), gw = up(gw0, DType::F32), gb = up(gb0, DType::F32);
      ops::mamba_conv1d_silu_bwd(up(x, dt), dw_, up(pre_r, dt), dseg, up(dy, dt), gdx, &gw, c.bias ? &gb : nullptr);
      expect_close_dt(gdx, dx, dt, "conv bwd dx " + what);
      // dw / dbias are fp32 sums of B*T products: fp32 tolerance scaled by their length
      const test::Tolerance tw = dt == DType::F32 ? test::Tolerance{1e-4, 1e-4} : test::tolerance(dt);
      expect_close(gw, hw, tw, dt == DType::F32 ? 1e-5 : 1e-2, "conv bwd dw " + what);
      if (c.bias) expect_close(gb, hb, tw, dt == DType::F32 ? 1e-5 : 1e-2, "conv bwd dbias " + what);
    }
}

// =============================================================================================== selective scan

struct ScanInputs {
  Tensor x, dt, A, Bm, Cm, D, seg;
};
ScanInputs scan_inputs(int64_t B, int64_t T, int64_t nh, int64_t P, int64_t G, int64_t S, DType dt, std::mt19937& rng) {
  ScanInputs s;
  s.x = rand_host({B, T, nh, P}, rng, dt);
  s.dt = rand_host({B, T, nh}, rng, DType::F32, 0.01f, 0.6f);
  s.A = Tensor::empty({nh}, DType::F32);
  for (int64_t h = 0; h < nh; ++h) s.A.f32()[h] = -0.05f - 2.5f * static_cast<float>(h) / static_cast<float>(nh);
  s.Bm = rand_host({B, T, G, S}, rng, dt);
  s.Cm = rand_host({B, T, G, S}, rng, dt);
  s.D = rand_host({nh}, rng, DType::F32, 0.5f, 1.5f);
  s.seg = packed_segments(B, T, rng);
  return s;
}

struct ScanCase {
  int64_t B, T, nh, P, G, S;
  bool packed;
};
const ScanCase kScanCases[] = {
    {1, 1, 1, 1, 1, 1, false},   {2, 7, 4, 3, 2, 5, true},     {1, 50, 4, 8, 2, 8, true},  // the fixture's geometry
    {2, 37, 6, 20, 3, 40, true}, {1, 64, 8, 64, 2, 128, false}, {1, 30, 2, 17, 1, 33, true},
    {1, 24, 4, 128, 4, 256, true},  // the largest head / state the CUDA scan takes
    {2, 129, 16, 16, 8, 64, true},
    // several 64-token chunks of the chunked SSD scan: a multiple of the chunk, a ragged end, two P tiles
    {1, 256, 2, 64, 2, 128, false}, {1, 300, 4, 64, 1, 128, true}, {1, 200, 2, 128, 1, 256, true}};

// Both CUDA scans (backend/cuda/mamba2.h): the chunked SSD one (the default) and the sequential recurrence.
const cu::ScanAlgorithm kAlgos[] = {cu::ScanAlgorithm::Chunked, cu::ScanAlgorithm::Sequential};
const char* algo_name(cu::ScanAlgorithm a) { return a == cu::ScanAlgorithm::Chunked ? " chunked" : " sequential"; }
// Restores the process-wide choice when a test ends (also on a failed ASSERT).
struct AlgoGuard {
  cu::ScanAlgorithm saved = cu::scan_algorithm();
  ~AlgoGuard() { cu::set_scan_algorithm(saved); }
};

std::string scan_name(DType dt, const ScanCase& c) {
  return std::string(dname(dt)) + " B" + std::to_string(c.B) + " T" + std::to_string(c.T) + " nh" + std::to_string(c.nh) +
         " P" + std::to_string(c.P) + " G" + std::to_string(c.G) + " S" + std::to_string(c.S) + (c.packed ? " packed" : "");
}

TEST(CudaMamba2Ops, ScanForwardMatchesCpu) {
  REQUIRE_DEVICE();
  AlgoGuard guard;
  std::mt19937 rng(21);
  for (cu::ScanAlgorithm algo : kAlgos)
  for (DType dt : kDtypes)
    for (const ScanCase& c : kScanCases) {
      cu::set_scan_algorithm(algo);
      const std::string what = scan_name(dt, c) + algo_name(algo);
      ScanInputs in = scan_inputs(c.B, c.T, c.nh, c.P, c.G, c.S, dt, rng);
      // asking for the per-step states runs the sequential scan whatever the choice: only there
      const bool with_states = algo == cu::ScanAlgorithm::Sequential && c.B * c.T * c.nh * c.P * c.S <= (int64_t(1) << 22);
      Tensor y = Tensor::empty(in.x.shape(), DType::F32), st;
      if (with_states) st = Tensor::empty({c.B, c.T, c.nh, c.P, c.S}, DType::F32);
      ops::mamba_ssm_scan_fwd(in.x, in.dt, in.A, in.Bm, in.Cm, in.D, c.packed ? &in.seg : nullptr, y, with_states ? &st : nullptr);
      Tensor gseg = cu::to_device(in.seg), gy = poisoned(in.x.shape(), dt), gst;
      if (with_states) gst = poisoned(st.shape(), DType::F32);
      ops::mamba_ssm_scan_fwd(up(in.x, dt), up(in.dt, DType::F32), up(in.A, DType::F32), up(in.Bm, dt), up(in.Cm, dt),
                              up(in.D, DType::F32), c.packed ? &gseg : nullptr, gy, with_states ? &gst : nullptr);
      expect_close_dt(gy, y, dt, "scan fwd y " + what);
      // the states are fp32 on both sides and computed from the same inputs in the same order
      if (with_states) expect_close(gst, st, test::tolerance(DType::F32), 1e-5, "scan fwd states " + what);
    }
}

TEST(CudaMamba2Ops, ScanBackwardMatchesCpu) {
  REQUIRE_DEVICE();
  AlgoGuard guard;
  std::mt19937 rng(31);
  for (cu::ScanAlgorithm algo : kAlgos)
  for (DType dt : kDtypes)
    for (const ScanCase& c : kScanCases) {
      cu::set_scan_algorithm(algo);
      const std::string what = scan_name(dt, c) + algo_name(algo);
      ScanInputs in = scan_inputs(c.B, c.T, c.nh, c.P, c.G, c.S, dt, rng);
      Tensor dy = rand_host(in.x.shape(), rng, dt);
      const Tensor* hseg = c.packed ? &in.seg : nullptr;
      Tensor dA0 = rand_host({c.nh}, rng), dD0 = rand_host({c.nh}, rng);
      Tensor dx = Tensor::empty(in.x.shape(), DType::F32), ddt = Tensor::empty(in.dt.shape(), DType::F32),
             dB = Tensor::empty(in.Bm.shape(), DType::F32), dC = Tensor::empty(in.Cm.shape(), DType::F32);
      Tensor dA = host_copy(dA0), dD = host_copy(dD0);
      ops::mamba_ssm_scan_bwd(in.x, in.dt, in.A, in.Bm, in.Cm, in.D, hseg, Tensor(), dy, dx, ddt, dA, dB, dC, dD);
      Tensor gseg = cu::to_device(in.seg);
      Tensor gdx = poisoned(in.x.shape(), dt), gddt = poisoned(in.dt.shape(), DType::F32), gdB = poisoned(in.Bm.shape(), dt),
             gdC = poisoned(in.Cm.shape(), dt), gdA = up(dA0, DType::F32), gdD = up(dD0, DType::F32);
      ops::mamba_ssm_scan_bwd(up(in.x, dt), up(in.dt, DType::F32), up(in.A, DType::F32), up(in.Bm, dt), up(in.Cm, dt),
                              up(in.D, DType::F32), c.packed ? &gseg : nullptr, Tensor(), up(dy, dt), gdx, gddt, gdA, gdB,
                              gdC, gdD);
      expect_close_dt(gdx, dx, dt, "scan bwd dx " + what);
      expect_close_dt(gdB, dB, dt, "scan bwd dB " + what);
      expect_close_dt(gdC, dC, dt, "scan bwd dC " + what);
      // ddt and dA come through the decay's gradient, which the device forms as a difference of within-segment
      // suffix sums (backend/cuda/mamba2.h) instead of <g_t, state_{t-1}>: fp32 rounding of the longer sums.
      const test::Tolerance tl = dt == DType::F32 ? test::Tolerance{1e-3, 1e-4} : test::tolerance(dt);
      expect_close(gddt, ddt, tl, dt == DType::F32 ? 1e-4 : 1e-2, "scan bwd ddt " + what);
      expect_close(gdA, dA, tl, dt == DType::F32 ? 1e-4 : 1e-2, "scan bwd dA " + what);
      expect_close(gdD, dD, tl, dt == DType::F32 ? 1e-5 : 1e-2, "scan bwd dD " + what);
    }
}

TEST(CudaMamba2Ops, ScanPackedRowEqualsSegmentsAlone) {
  // On the device itself: a packed row's outputs equal each segment run alone (the state never crosses). Bit for
  // bit with both scans: T < 64 keeps the chunked scan in one chunk, where the rows before the cut only add exact
  // zeros to the same sums in the same order.
  REQUIRE_DEVICE();
  AlgoGuard guard;
  for (cu::ScanAlgorithm algo : kAlgos) {
  SCOPED_TRACE(algo_name(algo));
  cu::set_scan_algorithm(algo);
  std::mt19937 rng(41);
  const int64_t T = 40, nh = 4, P = 8, G = 2, S = 16, cut = 13;
  ScanInputs in = scan_inputs(1, T, nh, P, G, S, DType::F32, rng);
  Tensor seg = Tensor::empty({1, T}, DType::I32);
  for (int64_t t = 0; t < T; ++t) seg.data<int32_t>()[t] = t < cut ? 0 : 1;
  Tensor gseg = cu::to_device(seg), gy = poisoned(in.x.shape(), DType::F32);
  ops::mamba_ssm_scan_fwd(up(in.x, DType::F32), up(in.dt, DType::F32), up(in.A, DType::F32), up(in.Bm, DType::F32),
                          up(in.Cm, DType::F32), up(in.D, DType::F32), &gseg, gy, nullptr);
  Tensor y = down(gy);
  auto tail = [&](const Tensor& t, int64_t per) {  // rows cut.. of a [1, T, ...] tensor as [1, T - cut, ...]
    Shape s = t.shape();
    s[1] = T - cut;
    Tensor r = Tensor::empty(s, t.dtype());
    std::copy(t.f32() + cut * per, t.f32() + T * per, r.f32());
    return r;
  };
  Tensor gy2 = poisoned({1, T - cut, nh, P}, DType::F32);
  ops::mamba_ssm_scan_fwd(up(tail(in.x, nh * P), DType::F32), up(tail(in.dt, nh), DType::F32), up(in.A, DType::F32),
                          up(tail(in.Bm, G * S), DType::F32), up(tail(in.Cm, G * S), DType::F32), up(in.D, DType::F32),
                          nullptr, gy2, nullptr);
  Tensor y2 = down(gy2);
  for (int64_t i = 0; i < y2.numel(); ++i) ASSERT_EQ(y.f32()[cut * nh * P + i], y2.f32()[i]) << i;
  }
}

// =============================================================================================== gated RMSNorm

TEST(CudaMamba2Ops, GatedRmsNormMatchesCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(51);
  struct Case {
    int64_t N, Din, group;
  };
  const Case cases[] = {{1, 4, 4}, {7, 64, 32}, {33, 96, 12}, {16, 8192, 1024}, {5, 200, 100}};
  for (DType dt : kDtypes)
    for (const Case& c : cases) {
      const std::string what = std::string(dname(dt)) + " N" + std::to_string(c.N) + " Din" + std::to_string(c.Din) +
                               " group" + std::to_string(c.group);
      Tensor y = rand_host({c.N, c.Din}, rng, dt, -2.f, 2.f), z = rand_host({c.N, c.Din}, rng, dt, -3.f, 3.f),
             w = rand_host({c.Din}, rng, DType::F32, 0.5f, 1.5f), dout = rand_host({c.N, c.Din}, rng, dt);
      const float eps = 1e-5f;
      Tensor out = Tensor::empty({c.N, c.Din}, DType::F32), rstd = Tensor::empty({c.N * (c.Din / c.group)}, DType::F32);
      ops::gated_rmsnorm_fwd(y, z, w, c.group, eps, out, rstd);
      Tensor gw = up(w, DType::F32), gout = poisoned({c.N, c.Din}, dt), grstd = poisoned(rstd.shape(), DType::F32);
      ops::gated_rmsnorm_fwd(up(y, dt), up(z, dt), gw, c.group, eps, gout, grstd);
      expect_close_dt(gout, out, dt, "gated norm fwd " + what);
      expect_close(grstd, rstd, test::tolerance(DType::F32), 1e-5, "gated norm rstd " + what);
      Tensor dw0 = rand_host({c.Din}, rng), hdw = host_copy(dw0);
      Tensor dy = Tensor::empty({c.N, c.Din}, DType::F32), dz = Tensor::empty({c.N, c.Din}, DType::F32);
      ops::gated_rmsnorm_bwd(y, z, w, rstd, c.group, dout, dy, dz, hdw);
      Tensor gdy = poisoned({c.N, c.Din}, dt), gdz = poisoned({c.N, c.Din}, dt), gdw = up(dw0, DType::F32);
      ops::gated_rmsnorm_bwd(up(y, dt), up(z, dt), gw, up(rstd, DType::F32), c.group, up(dout, dt), gdy, gdz, gdw);
      expect_close_dt(gdy, dy, dt, "gated norm bwd dy " + what);
      expect_close_dt(gdz, dz, dt, "gated norm bwd dz " + what);
      const test::Tolerance tw = dt == DType::F32 ? test::Tolerance{1e-4, 1e-4} : test::tolerance(dt);
      expect_close(gdw, hdw, tw, dt == DType::F32 ? 1e-5 : 1e-2, "gated norm bwd dw " + what);
      Tensor none;  // a frozen norm weight: no dw, the activation gradients still come
      Tensor gdy2 = poisoned({c.N, c.Din}, dt), gdz2 = poisoned({c.N, c.Din}, dt);
      ops::gated_rmsnorm_bwd(up(y, dt), up(z, dt), gw, up(rstd, DType::F32), c.group, up(dout, dt), gdy2, gdz2, none);
      expect_close_dt(gdy2, dy, dt, "gated norm bwd (no dw) dy " + what);
    }
}

// =============================================================================================== dt chain, A, relu2

TEST(CudaMamba2Ops, DtChainALogAndRelu2MatchCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(61);
  for (DType dt : kDtypes) {
    const int64_t N = 301, nh = 24;
    // dt_in spans the lower clamp (softplus(v) < 0.03 for v < -3.5), the middle and softplus's linear branch (v > 20)
    Tensor raw = rand_host({N, nh}, rng, dt, -8.f, 25.f), bias = rand_host({nh}, rng, DType::F32, -1.f, 1.f);
    for (float hi : {INFINITY, 4.f}) {
      const float lo = 0.03f;
      const std::string what = std::string(dname(dt)) + (std::isinf(hi) ? " hi=inf" : " hi=4");
      Tensor din = Tensor::empty({N, nh}, DType::F32), d = Tensor::empty({N, nh}, DType::F32);
      ops::mamba_dt_fwd(raw, bias, lo, hi, din, d);
      Tensor gdin = poisoned({N, nh}, DType::F32), gd = poisoned({N, nh}, DType::F32);
      ops::mamba_dt_fwd(up(raw, dt), up(bias, DType::F32), lo, hi, gdin, gd);
      expect_close(gdin, din, test::tolerance(DType::F32), 1e-6, "dt fwd dt_in " + what);
      expect_close(gd, d, test::tolerance(DType::F32), 1e-6, "dt fwd dt " + what);
      Tensor ddt = rand_host({N, nh}, rng), db0 = rand_host({nh}, rng), hdb = host_copy(db0);
      Tensor draw = Tensor::empty({N, nh}, DType::F32);
      ops::mamba_dt_bwd(din, ddt, lo, hi, draw, &hdb);
      Tensor gdraw = poisoned({N, nh}, dt), gdb = up(db0, DType::F32);
      ops::mamba_dt_bwd(up(din, DType::F32), up(ddt, DType::F32), lo, hi, gdraw, &gdb);
      expect_close_dt(gdraw, draw, dt, "dt bwd ddt_raw " + what);
      expect_close(gdb, hdb, test::Tolerance{1e-4, 1e-4}, 1e-5, "dt bwd ddt_bias " + what);
    }
    // A = -exp(A_log), dA_log += dA * A
    Tensor alog = rand_host({nh}, rng, DType::F32, -2.f, 2.f), A = Tensor::empty({nh}, DType::F32);
    ops::mamba_a_log_fwd(alog, A);
    Tensor gA = poisoned({nh}, DType::F32);
    ops::mamba_a_log_fwd(up(alog, DType::F32), gA);
    expect_close(gA, A, test::tolerance(DType::F32), 1e-6, "A = -exp(A_log)");
    Tensor dA = rand_host({nh}, rng), g0 = rand_host({nh}, rng), hg = host_copy(g0), gg = up(g0, DType::F32);
    ops::mamba_a_log_bwd(A, dA, hg);
    ops::mamba_a_log_bwd(up(A, DType::F32), up(dA, DType::F32), gg);
    expect_close(gg, hg, test::tolerance(DType::F32), 1e-6, "dA_log");
    // relu2
    for (int64_t n : {int64_t(1), int64_t(1000), int64_t(65537)}) {
      Tensor x = rand_host({n}, rng, dt, -2.f, 2.f), dy = rand_host({n}, rng, dt), y = Tensor::empty({n}, DType::F32),
             dx = Tensor::empty({n}, DType::F32);
      ops::relu2_fwd(x, y);
      ops::relu2_bwd(x, dy, dx);
      Tensor gy = poisoned({n}, dt), gdx = poisoned({n}, dt);
      ops::relu2_fwd(up(x, dt), gy);
      ops::relu2_bwd(up(x, dt), up(dy, dt), gdx);
      expect_close_dt(gy, y, dt, std::string("relu2 fwd ") + dname(dt));
      expect_close_dt(gdx, dx, dt, std::string("relu2 bwd ") + dname(dt));
    }
  }
}

TEST(CudaMamba2Ops, RejectsWhatItCannotRun) {
  REQUIRE_DEVICE();
  // conv kernel wider than 8 taps
  Tensor x = cu::empty({1, 4, 8}, DType::BF16), w = cu::empty({8, 1, 9}, DType::F32), pre = cu::empty({1, 4, 8}, DType::BF16),
         y = cu::empty({1, 4, 8}, DType::BF16);
  EXPECT_THROW(ops::mamba_conv1d_silu_fwd(x, w, nullptr, nullptr, pre, y), ShapeError);
  // head dim 129 / state 257
  auto scan = [](int64_t P, int64_t S) {
    Tensor sx = cu::empty({1, 2, 2, P}, DType::BF16), sdt = cu::empty({1, 2, 2}, DType::F32), sA = cu::empty({2}, DType::F32),
           sB = cu::empty({1, 2, 1, S}, DType::BF16), sC = cu::empty({1, 2, 1, S}, DType::BF16), sD = cu::empty({2}, DType::F32),
           sy = cu::empty({1, 2, 2, P}, DType::BF16);
    ops::mamba_ssm_scan_fwd(sx, sdt, sA, sB, sC, sD, nullptr, sy, nullptr);
  };
  EXPECT_THROW(scan(129, 16), ShapeError);
  EXPECT_THROW(scan(16, 257), ShapeError);
  // mixed activation dtypes, fp16, a host tensor among device ones
  Tensor yf = cu::empty({1, 4, 8}, DType::F32);
  EXPECT_THROW(ops::mamba_conv1d_silu_fwd(x, cu::empty({8, 1, 4}, DType::F32), nullptr, nullptr, pre, yf), ShapeError);
  Tensor h = cu::empty({16}, DType::F16), h2 = cu::empty({16}, DType::F16);
  EXPECT_THROW(ops::relu2_fwd(h, h2), ShapeError);
  Tensor host = Tensor::empty({16}, DType::F32), dev = cu::empty({16}, DType::F32);
  EXPECT_THROW(ops::relu2_fwd(host, dev), DeviceError);
}

// =============================================================================================== whole model

fs::path ref_torch(const std::string& c) {
  for (fs::path p : {fs::path("tests/fixtures/ref_torch") / c, fs::path(AM_SOURCE_DIR) / "tests/fixtures/ref_torch" / c})
    if (fs::exists(p / "recipe.yaml")) return p;
  return {};
}


void compare_training(const std::vector<std::string>& extra, const std::string& tag) {
  const fs::path dir = ref_torch("nemotron_h");
  if (dir.empty()) GTEST_SKIP() << "no tests/fixtures/ref_torch/nemotron_h";
  gpu_test::compare_cpu_cuda_training(dir, extra, tag);
}

TEST(CudaFamilies, NemotronHTrainsLikeCpu) {
  REQUIRE_DEVICE();
  compare_training({}, "nemotron_h");
}
TEST(CudaFamilies, NemotronHActivationCheckpointingTrainsLikeCpu) {
  REQUIRE_DEVICE();
  compare_training({"distributed.activation_checkpointing=true"}, "nemotron_h ckpt");
}
TEST(CudaFamilies, NemotronHBf16ResidualTrainsLikeCpu) {
  REQUIRE_DEVICE();
  compare_training({"model.backend.residual_dtype=bfloat16"}, "nemotron_h bf16 residual");
}

TEST(CudaFamilies, NemotronHPackedLogitsMatchCpu) {
  // forward_logits of a packed row (two samples, segment reset in the conv, the scan and attention) on the device
  // (bf16 activations) vs the host (fp32).
  REQUIRE_DEVICE();
  const fs::path dir = ref_torch("nemotron_h");
  if (dir.empty()) GTEST_SKIP() << "no tests/fixtures/ref_torch/nemotron_h";
  auto cfg = io::load_model_config((dir / "model/config.json").string());
  auto cpu = build_model(cfg), gpu = build_model(cfg);
  load_hf_weights(*cpu, (dir / "model").string());
  load_hf_weights(*gpu, (dir / "model").string());
  cpu->to_device(ExecContext::cpu());
  gpu->to_device(ExecContext::cuda_bf16(DType::F32));
  const std::vector<int32_t> a = {1, 17, 45, 200, 9, 33, 120}, b = {1, 250, 7, 88, 64, 5, 91, 150, 3};
  Sample packed;
  packed.input_ids = a;
  packed.input_ids.insert(packed.input_ids.end(), b.begin(), b.end());
  packed.labels = packed.input_ids;
  packed.seq_lens = {static_cast<int32_t>(a.size()), static_cast<int32_t>(b.size())};
  std::vector<const Sample*> ptrs{&packed};
  const Batch hb = collate(ptrs);
  Tensor lc = cpu->forward_logits(upload_batch(hb, cpu->exec()));
  Tensor lg = down(gpu->forward_logits(upload_batch(hb, gpu->exec())));
  expect_close(lg, lc, test::Tolerance{5e-2, 5e-2}, 3e-2, "nemotron_h packed logits (bf16 device vs fp32 host)");
}

}  // namespace
