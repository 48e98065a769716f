// gpt_oss ops on the CPU: attention with sinks (forward against a full-matrix double reference with the sink
// column, finite-difference gradients for q, k, v and the sinks, dsinks accumulating, the KV-cache decode
// path agreeing with the training kernel), the clamped interleaved SwiGLU of the experts (naive reference,
// finite differences on both sides of the clamps), the per-expert biases, MXFP4 dequantisation, and the
// DeviceError a CUDA tensor gets.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../common/tolerance.h"
#include "core/error.h"
#include "core/tensor.h"
#include "models/mxfp4.h"
#include "ops/gpt_oss_ops.h"
#include "ops/kv_attention.h"
#include "ops/ops.h"

using namespace am;
using am::test::fd_step;
using am::test::fd_tolerance;
using am::test::tolerance;
using am::test::Tolerance;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
const Tolerance kF32 = tolerance(DType::F32);
const Tolerance kFd = fd_tolerance(DType::F32);

Tensor randn(const Shape& shape, std::mt19937& rng, float stddev = 1.f) {
  Tensor t = Tensor::empty(shape, DType::F32);
  std::normal_distribution<float> d(0.f, stddev);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(rng);
  return t;
}

std::vector<double> values(const Tensor& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[static_cast<size_t>(i)] = t.f32()[i];
  return v;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, Tolerance tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool both_neg_inf = got[i] == -kInf && want[i] == -kInf;
    const double err = both_neg_inf ? 0.0 : std::abs(got[i] - want[i]);
    if (!(err <= tol.atol + tol.rtol * std::abs(want[i])) && ++bad <= 5)
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
  }
  EXPECT_EQ(bad, 0) << what;
}
void expect_close(const Tensor& got, const std::vector<double>& want, Tolerance tol, const std::string& what) {
  expect_close(values(got), want, tol, what);
}

double objective(const Tensor& out, const Tensor& r) {
  double s = 0.0;
  for (int64_t i = 0; i < out.numel(); ++i) s += static_cast<double>(out.f32()[i]) * r.f32()[i];
  return s;
}

std::vector<double> numeric_grad(Tensor& param, const std::function<double()>& f, double h = fd_step(DType::F32)) {
  std::vector<double> g(static_cast<size_t>(param.numel()));
  float* p = param.f32();
  for (int64_t i = 0; i < param.numel(); ++i) {
    const float orig = p[i];
    const float up = static_cast<float>(orig + h), down = static_cast<float>(orig - h);
    p[i] = up;
    const double fp = f();
    p[i] = down;
    const double fm = f();
    p[i] = orig;
    g[static_cast<size_t>(i)] = (fp - fm) / (static_cast<double>(up) - static_cast<double>(down));
  }
  return g;
}

// Segments with right padding on even rows (as test_ops_cpu.cpp's make_segments, simpler).
Tensor segments(int64_t B, int64_t T) {
  Tensor s = Tensor::empty({B, T}, DType::I32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) s.data<int32_t>()[b * T + t] = (b % 2 == 0 && t >= T - 2) ? -1 : static_cast<int32_t>(t / 4);
  return s;
}

// HF GptOss eager_attention_forward in double: the [T, T + 1] masked scores with the sink as a last column,
// softmax, the sink column dropped.
void sink_attention_ref(const Tensor& q, const Tensor& k, const Tensor& v, const ops::AttnParams& p,
                        std::vector<double>& out) {
  const int64_t B = p.batch, T = p.seq, NH = p.n_heads, NKV = p.n_kv_heads, D = p.head_dim;
  out.assign(static_cast<size_t>(B * T * NH * D), 0.0);
  auto seg = [&](int64_t b, int64_t t) { return p.segment_ids ? p.segment_ids->data<int32_t>()[b * T + t] : 0; };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t kh = h / (NH / NKV);
        std::vector<double> s(static_cast<size_t>(T + 1), -kInf);
        bool any = false;
        for (int64_t j = 0; j <= i; ++j) {
          if (p.sliding_window > 0 && i - j >= p.sliding_window) continue;
          if (p.segment_ids && (seg(b, i) < 0 || seg(b, j) != seg(b, i))) continue;
          double acc = 0;
          for (int64_t d = 0; d < D; ++d)
            acc += static_cast<double>(q.f32()[((b * T + i) * NH + h) * D + d]) * k.f32()[((b * T + j) * NKV + kh) * D + d];
          s[j] = acc * p.scale;
          any = true;
        }
        if (!any) continue;  // padding row: out = 0
        s[T] = p.sinks->f32()[h];
        double m = -kInf, l = 0;
        for (double x : s) m = std::max(m, x);
        for (double x : s) l += std::exp(x - m);
        for (int64_t j = 0; j < T; ++j) {
          const double P = std::exp(s[j] - m) / l;
          for (int64_t d = 0; d < D; ++d)
            out[((b * T + i) * NH + h) * D + d] += P * v.f32()[((b * T + j) * NKV + kh) * D + d];
        }
      }
}

struct Case {
  int64_t B, T, nh, nkv, D, window;
  bool segments;
};
const std::vector<Case> kCases = {
    {1, 5, 2, 2, 4, 0, false}, {2, 7, 4, 2, 8, 0, false}, {1, 9, 4, 2, 4, 3, false},
    {2, 10, 4, 2, 4, 0, true}, {3, 9, 4, 1, 8, 4, true},
};

ops::AttnParams params(const Case& c, const Tensor* seg, const Tensor* sinks) {
  ops::AttnParams p;
  p.batch = c.B;
  p.seq = c.T;
  p.n_heads = c.nh;
  p.n_kv_heads = c.nkv;
  p.head_dim = c.D;
  p.scale = 1.f / std::sqrt(static_cast<float>(c.D));
  p.sliding_window = c.window;
  p.segment_ids = c.segments ? seg : nullptr;
  p.sinks = sinks;
  return p;
}

}  // namespace

TEST(GptOssAttentionSinks, ForwardMatchesReferenceWithSinkColumn) {
  uint32_t seed = 10;
  for (const Case& c : kCases) {
    std::mt19937 rng(seed++);
    Tensor q = randn({c.B, c.T, c.nh, c.D}, rng), k = randn({c.B, c.T, c.nkv, c.D}, rng),
           v = randn({c.B, c.T, c.nkv, c.D}, rng), sinks = randn({c.nh}, rng, 2.f);
    Tensor seg = segments(c.B, c.T);
    const ops::AttnParams p = params(c, &seg, &sinks);
    Tensor out = Tensor::empty({c.B, c.T, c.nh, c.D}, DType::F32), lse = Tensor::empty({c.B, c.nh, c.T}, DType::F32);
    ops::attention_fwd(q, k, v, p, out, lse);
    std::vector<double> want;
    sink_attention_ref(q, k, v, p, want);
    expect_close(out, want, kF32, "sink attention out");
    // The sinks matter: without them the output differs.
    ops::AttnParams p0 = p;
    p0.sinks = nullptr;
    Tensor out0 = Tensor::empty(out.shape(), DType::F32);
    ops::attention_fwd(q, k, v, p0, out0, lse);
    double diff = 0;
    for (int64_t i = 0; i < out.numel(); ++i) diff = std::max(diff, std::abs(double(out.f32()[i]) - out0.f32()[i]));
    EXPECT_GT(diff, 1e-3);
  }
}

TEST(GptOssAttentionSinks, GradientsFiniteDifferenceIncludingSinks) {
  uint32_t seed = 50;
  for (const Case& c : kCases) {
    std::mt19937 rng(seed++);
    Tensor q = randn({c.B, c.T, c.nh, c.D}, rng), k = randn({c.B, c.T, c.nkv, c.D}, rng),
           v = randn({c.B, c.T, c.nkv, c.D}, rng), r = randn({c.B, c.T, c.nh, c.D}, rng),
           sinks = randn({c.nh}, rng);
    Tensor seg = segments(c.B, c.T);
    const ops::AttnParams p = params(c, &seg, &sinks);
    Tensor out = Tensor::empty({c.B, c.T, c.nh, c.D}, DType::F32), lse = Tensor::empty({c.B, c.nh, c.T}, DType::F32);
    auto f = [&] {
      ops::attention_fwd(q, k, v, p, out, lse);
      return objective(out, r);
    };
    f();
    Tensor dq = Tensor::empty(q.shape(), DType::F32), dk = Tensor::empty(k.shape(), DType::F32),
           dv = Tensor::empty(v.shape(), DType::F32), ds = Tensor::zeros({c.nh}, DType::F32);
    ops::attention_bwd(q, k, v, out, lse, r, p, dq, dk, dv, &ds);
    expect_close(dq, numeric_grad(q, f), kFd, "dq");
    expect_close(dk, numeric_grad(k, f), kFd, "dk");
    expect_close(dv, numeric_grad(v, f), kFd, "dv");
    expect_close(ds, numeric_grad(sinks, f), kFd, "dsinks");
    // dsinks is a parameter gradient: a second backward adds the same amount again.
    std::vector<double> once = values(ds);
    f();
    ops::attention_bwd(q, k, v, out, lse, r, p, dq, dk, dv, &ds);
    for (auto& x : once) x *= 2;
    expect_close(ds, once, kF32, "dsinks accumulates");
  }
}

TEST(GptOssAttentionSinks, DecodeWithCacheMatchesTrainingKernel) {
  std::mt19937 rng(77);
  const int64_t T = 9, nh = 4, nkv = 2, D = 8;
  Tensor q = randn({1, T, nh, D}, rng), k = randn({1, T, nkv, D}, rng), v = randn({1, T, nkv, D}, rng),
         sinks = randn({nh}, rng);
  Case c{1, T, nh, nkv, D, 4, false};
  const ops::AttnParams p = params(c, nullptr, &sinks);
  Tensor out = Tensor::empty({1, T, nh, D}, DType::F32), lse = Tensor::empty({1, nh, T}, DType::F32);
  ops::attention_fwd(q, k, v, p, out, lse);
  // The last 3 queries over all T cached keys.
  const int64_t tq = 3;
  Tensor ql = Tensor::empty({1, tq, nh, D}, DType::F32);
  for (int64_t i = 0; i < tq * nh * D; ++i) ql.f32()[i] = q.f32()[(T - tq) * nh * D + i];
  ops::AttnParams pk = p;
  pk.seq = tq;
  Tensor ok = Tensor::empty({1, tq, nh, D}, DType::F32);
  ops::attention_kv_fwd(ql, k, v, pk, ok);
  std::vector<double> want(static_cast<size_t>(tq * nh * D));
  for (int64_t i = 0; i < tq * nh * D; ++i) want[static_cast<size_t>(i)] = out.f32()[(T - tq) * nh * D + i];
  expect_close(ok, want, kF32, "kv decode with sinks");
}

// Sinks run on CUDA too (the generic kernels, tests/gpu/test_cuda_attention.cpp); what is refused on either
// device, before any kernel runs: sinks of the wrong shape (ShapeError naming the op) and sinks on another
// device than q (DeviceError). The "CUDA" tensors below wrap host memory: only the checks may look at them.
TEST(GptOssAttentionSinks, BadSinksAreRefusedOnEitherDevice) {
  std::mt19937 rng(3);
  Case c{1, 4, 2, 2, 4, 0, false};
  Tensor q = randn({1, 4, 2, 4}, rng), k = randn({1, 4, 2, 4}, rng), v = randn({1, 4, 2, 4}, rng);
  Tensor out = Tensor::empty(q.shape(), DType::F32), lse = Tensor::empty({1, 2, 4}, DType::F32);
  Tensor bad = randn({3}, rng);
  EXPECT_THROW(ops::attention_fwd(q, k, v, params(c, nullptr, &bad), out, lse), ShapeError);
  auto buf = std::make_shared<std::vector<float>>(64);
  auto cuda = [&](const Shape& s) { return Tensor::wrap(buf->data(), s, DType::F32, buf, DeviceType::CUDA); };
  Tensor cq = cuda(q.shape()), ck = cuda(k.shape()), cv = cuda(v.shape()), co = cuda(q.shape()), cl = cuda({1, 2, 4}),
         cbad = cuda({3});
  try {
    ops::attention_fwd(cq, ck, cv, params(c, nullptr, &cbad), co, cl);
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("attention_fwd"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("sinks"), std::string::npos) << e.what();
  }
  Tensor host_sinks = randn({2}, rng);
  EXPECT_THROW(ops::attention_fwd(cq, ck, cv, params(c, nullptr, &host_sinks), co, cl), DeviceError);
}

// ---------------- experts ----------------

namespace {

void glu_ref(const Tensor& gu, float alpha, float limit, std::vector<double>& h) {
  const int64_t I = gu.dim(-1) / 2, M = gu.numel() / (2 * I);
  h.assign(static_cast<size_t>(M * I), 0.0);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < I; ++c) {
      const double g = std::min<double>(gu.f32()[r * 2 * I + 2 * c], limit);
      const double u = std::clamp<double>(gu.f32()[r * 2 * I + 2 * c + 1], -limit, limit);
      h[static_cast<size_t>(r * I + c)] = (u + 1) * g / (1 + std::exp(-alpha * g));
    }
}

// Values spread over [-3 limit, 3 limit] but kept at least 0.05 away from the kinks +-limit, so central
// differences with step 0.01 never straddle a clamp.
Tensor spread(const Shape& shape, float limit, std::mt19937& rng) {
  Tensor t = Tensor::empty(shape, DType::F32);
  std::uniform_real_distribution<float> d(-3 * limit, 3 * limit);
  for (int64_t i = 0; i < t.numel(); ++i) {
    float x;
    do x = d(rng);
    while (std::abs(std::abs(x) - limit) < 0.05f);
    t.f32()[i] = x;
  }
  return t;
}

}  // namespace

TEST(GptOssExperts, ClampedGluForwardAndFiniteDifferenceBothSidesOfTheClamps) {
  std::mt19937 rng(5);
  for (float limit : {7.f, 1.5f}) {
    const float alpha = 1.702f;
    const int64_t M = 13, I = 6;
    Tensor gu = spread({M, 2 * I}, limit, rng), r = randn({M, I}, rng);
    int clamped_gate = 0, clamped_up = 0;
    for (int64_t i = 0; i < gu.numel(); ++i) {
      const float x = gu.f32()[i];
      if (i % 2 == 0) clamped_gate += x > limit;
      else clamped_up += std::abs(x) > limit;
    }
    ASSERT_GT(clamped_gate, 0);
    ASSERT_GT(clamped_up, 0);
    Tensor h = Tensor::empty({M, I}, DType::F32);
    ops::gpt_oss_glu_fwd(gu, alpha, limit, h);
    std::vector<double> want;
    glu_ref(gu, alpha, limit, want);
    expect_close(h, want, kF32, "gpt_oss_glu h");
    auto f = [&] {
      ops::gpt_oss_glu_fwd(gu, alpha, limit, h);
      return objective(h, r);
    };
    Tensor dgu = Tensor::empty(gu.shape(), DType::F32);
    ops::gpt_oss_glu_bwd(gu, r, alpha, limit, dgu);
    const std::vector<double> num = numeric_grad(gu, f);
    expect_close(dgu, num, kFd, "gpt_oss_glu dgu");
    for (int64_t i = 0; i < gu.numel(); ++i) {  // clamped inputs get exactly no gradient
      const float x = gu.f32()[i];
      if ((i % 2 == 0 && x > limit) || (i % 2 == 1 && std::abs(x) > limit)) EXPECT_EQ(dgu.f32()[i], 0.f) << i;
    }
  }
}

TEST(GptOssExperts, GroupedBiasAddAndBackward) {
  std::mt19937 rng(9);
  const int64_t E = 4, C = 5;
  const std::vector<int32_t> offs = {0, 3, 3, 7, 8};  // expert 1 has no rows
  Tensor o = Tensor::empty({E + 1}, DType::I32);
  for (int64_t e = 0; e <= E; ++e) o.data<int32_t>()[e] = offs[static_cast<size_t>(e)];
  Tensor y = randn({8, C}, rng), bias = randn({E, C}, rng);
  std::vector<double> want = values(y);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = offs[e]; r < offs[e + 1]; ++r)
      for (int64_t c = 0; c < C; ++c) want[static_cast<size_t>(r * C + c)] += bias.f32()[e * C + c];
  ops::grouped_bias_add(y, bias, o);
  expect_close(y, want, kF32, "grouped_bias_add");
  Tensor dy = randn({8, C}, rng), db = Tensor::zeros({E, C}, DType::F32);
  db.f32()[0] = 1.f;  // accumulates
  ops::grouped_bias_bwd(dy, o, db);
  std::vector<double> wdb(static_cast<size_t>(E * C), 0.0);
  wdb[0] = 1.0;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = offs[e]; r < offs[e + 1]; ++r)
      for (int64_t c = 0; c < C; ++c) wdb[static_cast<size_t>(e * C + c)] += dy.f32()[r * C + c];
  expect_close(db, wdb, kF32, "grouped_bias_bwd");
}

TEST(GptOssMxfp4, DequantisesLowNibbleFirstWithE8M0Scales) {
  // Block 0: scale 127 (x1); bytes 0x21 -> (lo 1 = 0.5, hi 2 = 1.0), 0xF8 -> (lo 8 = -0, hi 15 = -6).
  // Block 1: scale 129 (x4); byte 0x7A -> (lo 10 = -1, hi 7 = 6) -> -4, 24. Scale 120: x 2^-7.
  uint8_t blocks[48] = {};
  blocks[0] = 0x21;
  blocks[1] = 0xF8;
  blocks[16] = 0x7A;
  blocks[32] = 0x03;  // lo 3 = 1.5, hi 0 = 0
  const uint8_t scales[3] = {127, 129, 120};
  std::vector<float> out(96, 123.f);
  mxfp4_dequantize(blocks, scales, 3, out.data());
  EXPECT_EQ(out[0], 0.5f);
  EXPECT_EQ(out[1], 1.0f);
  EXPECT_EQ(out[2], 0.f);
  EXPECT_TRUE(std::signbit(out[2]));
  EXPECT_EQ(out[3], -6.f);
  EXPECT_EQ(out[4], 0.f);
  EXPECT_EQ(out[32], -4.f);
  EXPECT_EQ(out[33], 24.f);
  EXPECT_EQ(out[64], 1.5f / 128.f);
  EXPECT_EQ(out[65], 0.f);
}
