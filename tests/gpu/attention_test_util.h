// Shared by the attention GPU tests (test_cuda_attention.cpp, test_cuda_cudnn_attention.cpp): bf16-exact random
// inputs, device tensors on their own cudaMalloc, host <-> device moves, the relative L2 error, the CPU reference of
// one attention call (am::ops::attention_fwd/bwd on fp32 host copies) and the checks of a device forward / backward
// against it. Header-only; everything in am::attn_test, which also re-exports the am types it takes and
// gpu_test::have_device: a test file says `using namespace am::attn_test;`.
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../common/attn_params.h"
#include "core/attn_params.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "gpu_test_util.h"
#include "ops/ops.h"

namespace am::attn_test {

using am::AttnParams;
using am::DType;
using am::Shape;
using am::Tensor;
using gpu_test::have_device;

// Device tensor from raw cudaMalloc, freed with the last reference.
inline Tensor dev_empty(const Shape& s, DType dt) {
  void* p = nullptr;
  const size_t bytes = std::max<size_t>(16, static_cast<size_t>(shape_numel(s)) * dtype_size(dt));
  if (cudaMalloc(&p, bytes) != cudaSuccess) throw DeviceError("test: cudaMalloc failed");
  std::shared_ptr<void> keep(p, [](void* q) { cudaFree(q); });
  return Tensor::wrap(p, s, dt, keep, DeviceType::CUDA);
}

inline std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = f32_to_bf16(x[i]);
  return r;
}
inline std::vector<float> from_bf16(const std::vector<uint16_t>& x) {
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = bf16_to_f32(x[i]);
  return r;
}

// Random N(0, sd^2) values already rounded to bf16 (so host and device see identical inputs).
inline std::vector<float> randn_bf16(size_t n, std::mt19937& rng, float sd = 1.f) {
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> x(n);
  for (auto& v : x) v = bf16_to_f32(f32_to_bf16(nd(rng)));
  return x;
}

inline Tensor upload_bf16(const std::vector<float>& x, const Shape& s) {
  Tensor t = dev_empty(s, DType::BF16);
  auto h = to_bf16(x);
  if (cudaMemcpy(t.raw(), h.data(), h.size() * 2, cudaMemcpyHostToDevice) != cudaSuccess)
    throw DeviceError("test: upload failed");
  return t;
}
inline std::vector<float> download_bf16(const Tensor& t) {
  std::vector<uint16_t> h(static_cast<size_t>(t.numel()));
  if (cudaMemcpy(h.data(), t.raw(), h.size() * 2, cudaMemcpyDeviceToHost) != cudaSuccess)
    throw DeviceError("test: download failed");
  return from_bf16(h);
}
inline std::vector<float> download_f32(const Tensor& t) {
  std::vector<float> h(static_cast<size_t>(t.numel()));
  if (cudaMemcpy(h.data(), t.raw(), h.size() * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
    throw DeviceError("test: download failed");
  return h;
}
// Host values to the device as dt (BF16 rounds; F32 as they are); back as fp32 whatever the dtype.
inline Tensor upload_as(const std::vector<float>& x, const Shape& s, DType dt) {
  if (dt == DType::BF16) return upload_bf16(x, s);
  Tensor t = dev_empty(s, DType::F32);
  if (cudaMemcpy(t.raw(), x.data(), x.size() * 4, cudaMemcpyHostToDevice) != cudaSuccess)
    throw DeviceError("test: upload failed");
  return t;
}
inline std::vector<float> download_as_f32(const Tensor& t) {
  return t.dtype() == DType::BF16 ? download_bf16(t) : download_f32(t);
}
// Segment ids (int32) on the host and on the device.
inline Tensor host_i32(const std::vector<int32_t>& x, const Shape& s) {
  Tensor t = Tensor::empty(s, DType::I32);
  std::memcpy(t.raw(), x.data(), x.size() * 4);
  return t;
}
inline Tensor upload_i32(const std::vector<int32_t>& x, const Shape& s) {
  Tensor t = dev_empty(s, DType::I32);
  if (cudaMemcpy(t.raw(), x.data(), x.size() * 4, cudaMemcpyHostToDevice) != cudaSuccess)
    throw DeviceError("test: upload failed");
  return t;
}
inline void poison(Tensor& t) {  // 0xFF bytes: NaN in bf16 and fp32
  cudaMemset(t.raw(), 0xFF, t.nbytes());
}

inline Tensor host_f32(const std::vector<float>& x, const Shape& s) {
  Tensor t = Tensor::empty(s, DType::F32);
  std::memcpy(t.raw(), x.data(), x.size() * 4);
  return t;
}
inline std::vector<float> host_vec(const Tensor& t) {
  const float* p = t.data<float>();
  return std::vector<float>(p, p + t.numel());
}

// ||got - ref|| / ||ref|| (||got - ref|| where ref is 0); infinity when got has a non-finite element (counted in
// *nonfinite).
inline double rel_err(const std::vector<float>& got, const std::vector<float>& ref, size_t* nonfinite = nullptr) {
  double num = 0, den = 0;
  size_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) {
      ++bad;
      continue;
    }
    const double d = static_cast<double>(got[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  if (nonfinite) *nonfinite = bad;
  if (bad) return std::numeric_limits<double>::infinity();
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

using test::attn_params;  // tests/common/attn_params.h

// The shapes of one call's tensors: q [B, T, nh, D], k [B, T, nkv, D], v [B, T, nkv, Dv], out [B, T, nh, Dv],
// lse [B, nh, T].
struct AttnShapes {
  Shape q, k, v, o, lse;
};
inline AttnShapes attn_shapes(const AttnParams& p) {
  const int64_t B = p.batch, T = p.seq, nh = p.n_heads, nkv = p.n_kv_heads, D = p.head_dim, Dv = p.dv();
  return {{B, T, nh, D}, {B, T, nkv, D}, {B, T, nkv, Dv}, {B, T, nh, Dv}, {B, nh, T}};
}

// Random bf16-exact q, k, v, dout for p's shapes (drawn in that order; q and k with sd_qk, v and dout with 1).
struct HostInputs {
  std::vector<float> q, k, v, dout;
};
inline HostInputs random_inputs(const AttnParams& p, std::mt19937& rng, float sd_qk = 1.f) {
  const int64_t B = p.batch, T = p.seq, nh = p.n_heads, nkv = p.n_kv_heads, D = p.head_dim, Dv = p.dv();
  HostInputs in;
  in.q = randn_bf16(B * T * nh * D, rng, sd_qk);
  in.k = randn_bf16(B * T * nkv * D, rng, sd_qk);
  in.v = randn_bf16(B * T * nkv * Dv, rng);
  in.dout = randn_bf16(B * T * nh * Dv, rng);
  return in;
}

// The same inputs on the device as dt.
struct DeviceInputs {
  Tensor q, k, v, dout;
};
inline DeviceInputs upload_inputs(const HostInputs& in, const AttnParams& p, DType dt = DType::BF16) {
  const AttnShapes s = attn_shapes(p);
  return {upload_as(in.q, s.q, dt), upload_as(in.k, s.k, dt), upload_as(in.v, s.v, dt), upload_as(in.dout, s.o, dt)};
}

// Segment ids [B, T] on the host (for the reference) and on the device; none (nullptr) when seg is empty.
struct SegmentIds {
  Tensor host, dev;
  SegmentIds(const std::vector<int32_t>& seg, int64_t B, int64_t T) {
    if (seg.empty()) return;
    host = host_i32(seg, {B, T});
    dev = upload_i32(seg, {B, T});
  }
  const Tensor* on_host() const { return host.defined() ? &host : nullptr; }
  const Tensor* on_device() const { return dev.defined() ? &dev : nullptr; }
};

// The CPU reference on fp32 host copies, with seg's host segment ids and `sinks` (nullptr: none) in place of p's:
// out, lse, dq, dk, dv, and dsinks (the backward adds into zeros; with_dsinks false: no dsinks asked for, and they
// stay zero).
struct Reference {
  std::vector<float> out, lse, dq, dk, dv, dsinks;
};
inline Reference cpu_reference(AttnParams p, const HostInputs& in, const SegmentIds& seg,
                               const std::vector<float>* sinks = nullptr, bool with_dsinks = false) {
  const AttnShapes s = attn_shapes(p);
  Tensor hsinks = sinks ? host_f32(*sinks, {p.n_heads}) : Tensor(), hdsinks = Tensor::zeros({p.n_heads}, DType::F32);
  p.segment_ids = seg.on_host();
  p.sinks = sinks ? &hsinks : nullptr;
  Tensor hq = host_f32(in.q, s.q), hk = host_f32(in.k, s.k), hv = host_f32(in.v, s.v), hdo = host_f32(in.dout, s.o);
  Tensor hout = Tensor::empty(s.o, DType::F32), hlse = Tensor::empty(s.lse, DType::F32);
  ops::attention_fwd(hq, hk, hv, p, hout, hlse);
  Tensor hdq = Tensor::empty(s.q, DType::F32), hdk = Tensor::empty(s.k, DType::F32),
         hdv = Tensor::empty(s.v, DType::F32);
  ops::attention_bwd(hq, hk, hv, hout, hlse, hdo, p, hdq, hdk, hdv, with_dsinks ? &hdsinks : nullptr);
  return {host_vec(hout), host_vec(hlse), host_vec(hdq), host_vec(hdk), host_vec(hdv), host_vec(hdsinks)};
}

// The device call's parameters: p with seg's device segment ids and the device sinks (nullptr: none).
inline AttnParams device_params(const AttnParams& p, const SegmentIds& seg, const Tensor* sinks) {
  AttnParams dp = p;
  dp.segment_ids = seg.on_device();
  dp.sinks = sinks;
  return dp;
}

// Scale of each head's dsinks sum (its terms have both signs): sum_i e^(s_h - lse_i) |dout_i . out_i|.
inline std::vector<double> dsink_scales(const AttnParams& p, const Reference& ref, const std::vector<float>& dout,
                                        const std::vector<float>& sinks) {
  const int64_t B = p.batch, T = p.seq, nh = p.n_heads, Dv = p.dv();
  std::vector<double> scale(static_cast<size_t>(nh), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const float L = ref.lse[(b * nh + h) * T + t];
        if (std::isinf(L)) continue;
        double dd = 0;
        for (int64_t x = 0; x < Dv; ++x)
          dd += static_cast<double>(dout[((b * T + t) * nh + h) * Dv + x]) * ref.out[((b * T + t) * nh + h) * Dv + x];
        scale[h] += std::exp(static_cast<double>(sinks[h]) - L) * std::fabs(dd);
      }
  return scale;
}

// A device forward's out / lse (as fp32) against the reference: no non-finite out, lse -inf exactly where the
// reference's is (rows that see no key) and finite elsewhere, those rows' out exactly zero, out's relative L2 error
// below tol_out and lse's max abs error below tol_lse. `pad_what` names the zero-row failure. Returns the errors.
struct FwdErrors {
  double out = 0, lse = 0;
};
inline FwdErrors check_forward(const std::vector<float>& got, const std::vector<float>& got_lse, const Reference& ref,
                               const AttnParams& p, const std::string& tag, double tol_out, double tol_lse,
                               const char* pad_what = "padding rows not zero") {
  const int64_t B = p.batch, T = p.seq, nh = p.n_heads, Dv = p.dv();
  FwdErrors e;
  size_t nf = 0, lse_bad = 0, pad_bad = 0;
  e.out = rel_err(got, ref.out, &nf);
  for (size_t i = 0; i < ref.lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) {
      if (!(std::isinf(got_lse[i]) && got_lse[i] < 0)) ++lse_bad;
    } else if (!std::isfinite(got_lse[i])) {
      ++lse_bad;
    } else {
      e.lse = std::max(e.lse, static_cast<double>(std::fabs(got_lse[i] - ref.lse[i])));
    }
  }
  for (int64_t b = 0; b < B; ++b)  // rows that see no key (padding; they ignore any sink): out 0, lse -inf
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < nh; ++h)
        if (std::isinf(ref.lse[(b * nh + h) * T + t]))
          for (int64_t d = 0; d < Dv; ++d)
            if (got[((b * T + t) * nh + h) * Dv + d] != 0.f) ++pad_bad;
  EXPECT_EQ(nf, 0u) << tag << ": non-finite outputs (unwritten?)";
  EXPECT_EQ(lse_bad, 0u) << tag << ": lse -inf / finiteness mismatches";
  EXPECT_EQ(pad_bad, 0u) << tag << ": " << pad_what;
  EXPECT_LT(e.out, tol_out) << tag;
  EXPECT_LT(e.lse, tol_lse) << tag;
  return e;
}

// A device backward's dq / dk / dv (as fp32) against the reference: none non-finite, each relative L2 error below
// tol. Returns the errors.
struct GradErrors {
  double dq = 0, dk = 0, dv = 0;
};
inline GradErrors check_grads(const std::vector<float>& dq, const std::vector<float>& dk, const std::vector<float>& dv,
                              const Reference& ref, const std::string& tag, double tol) {
  size_t n1 = 0, n2 = 0, n3 = 0;
  const GradErrors e{rel_err(dq, ref.dq, &n1), rel_err(dk, ref.dk, &n2), rel_err(dv, ref.dv, &n3)};
  EXPECT_EQ(n1 + n2 + n3, 0u) << tag << ": non-finite gradients (unwritten?) dq " << n1 << " dk " << n2 << " dv "
                              << n3;
  EXPECT_LT(e.dq, tol) << tag;
  EXPECT_LT(e.dk, tol) << tag;
  EXPECT_LT(e.dv, tol) << tag;
  return e;
}

// dsinks after a backward that accumulated into `init` against the reference's: every element finite, and the
// largest error relative to its head's scale (dsink_scales) below tol. Returns that error.
inline double check_dsinks(const std::vector<float>& got, float init, const Reference& ref,
                           const std::vector<double>& scale, const std::string& tag, double tol) {
  double e = 0;
  for (size_t h = 0; h < got.size(); ++h) {
    EXPECT_TRUE(std::isfinite(got[h])) << tag << ": dsinks[" << h << "]";
    const double err = std::fabs((static_cast<double>(got[h]) - init) - ref.dsinks[h]);
    e = std::max(e, err / std::max(1e-6, scale[h]));
  }
  EXPECT_LT(e, tol) << tag << ": dsinks (error relative to the sum of |terms|)";
  return e;
}

// The bwd_split modes worth running for a GQA group of nh / nkv: 1 (no split), 0 (auto: small cases split the whole
// group) where there is a group, 2 where it has 4 or more heads.
inline std::vector<int> bwd_splits(int64_t nh, int64_t nkv) {
  const int64_t group = nh / nkv;
  std::vector<int> splits{1};
  if (group > 1) splits.push_back(0);
  if (group >= 4) splits.push_back(2);
  return splits;
}

// Runs run(case, seed, &worst_fwd, &worst_bwd) for each case, with seeds seed, seed + 1, ..., stopping at the first
// fatal failure; then prints "<what> worst rel error: forward out ..., backward ...".
template <typename Case, typename Run>
void run_cases(const std::vector<Case>& cases, uint32_t seed, const std::string& what, Run run) {
  double wf = 0, wb = 0;
  for (const auto& c : cases) {
    run(c, seed++, &wf, &wb);
    if (::testing::Test::HasFatalFailure()) return;
  }
  std::printf("%s worst rel error: forward out %.3e, backward %.3e\n", what.c_str(), wf, wb);
}

}  // namespace am::attn_test
