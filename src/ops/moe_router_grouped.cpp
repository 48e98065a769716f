// DeepSeek's routers (contract in moe_ops.h): sigmoid or softmax scores, optional per-expert selection
// bias, group-limited top-k. The checks are here for both devices; the reference runs on the host in fp32 (as HF
// computes the router) and CUDA tensors go to backend/cuda/moe_router_grouped.cu, which follows it operation by
// operation.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "ops/moe_ops.h"
#include "ops/op_checks.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/moe_router_grouped.h"
#endif

namespace am::ops {

namespace {

using detail::describe;
using detail::device_of;
using detail::shape_error;

void need_f32(const char* op, const char* name, const Tensor& t) {
  if (t.dtype() != DType::F32) shape_error(op, describe(name, t) + ": expected float32");
}
// Host tensors are float32 (the reference); CUDA logits / dlogits / bias may be bf16 too.
void need_float_on(const char* op, DeviceType dev, const char* name, const Tensor& t) {
  if (dev == DeviceType::CUDA && (t.dtype() == DType::BF16 || t.dtype() == DType::F32)) return;
  if (dev == DeviceType::CUDA) shape_error(op, describe(name, t) + ": expected bfloat16 or float32");
  need_f32(op, name, t);
}
#ifndef AM_WITH_CUDA
[[noreturn]] void no_cuda_build(const char* op) {
  throw DeviceError(std::string("op ") + op + ": CUDA tensor given but the CUDA backend is not built");
}
#endif

// Indices of the k largest of v[0..n) in descending order; ties: lower index first (strict '>').
void topk_desc(const float* v, int64_t n, int64_t k, int32_t* out) {
  std::vector<char> taken(static_cast<size_t>(n), 0);
  for (int64_t s = 0; s < k; ++s) {
    int64_t best = -1;
    for (int64_t j = 0; j < n; ++j)
      if (!taken[static_cast<size_t>(j)] && (best < 0 || v[j] > v[best])) best = j;
    taken[static_cast<size_t>(best)] = 1;
    out[s] = static_cast<int32_t>(best);
  }
}

}  // namespace

void moe_router_grouped_fwd(const Tensor& logits, const Tensor* bias, int64_t k, const GroupedRouterOptions& o,
                            Tensor& scores, Tensor& topk_idx, Tensor& topk_w) {
  const char* op = "moe_router_grouped_fwd";
  const DeviceType dev = device_of(op, {{"logits", &logits}, {"bias", bias}, {"scores", &scores},
                                        {"topk_idx", &topk_idx}, {"topk_w", &topk_w}});
  need_float_on(op, dev, "logits", logits);
  need_f32(op, "scores", scores);
  need_f32(op, "topk_w", topk_w);
  if (logits.ndim() != 2) shape_error(op, describe("logits", logits) + ": expected [N, E]");
  const int64_t N = logits.dim(0), E = logits.dim(1);
  if (scores.shape() != logits.shape()) shape_error(op, describe("scores", scores) + ": expected the logits' shape");
  if (topk_idx.dtype() != DType::I32 || topk_idx.shape() != Shape{N, k} || topk_w.shape() != Shape{N, k})
    shape_error(op, describe("topk_idx", topk_idx) + ", " + describe("topk_w", topk_w) + ": expected [N, k] int32 / fp32");
  if (k < 1 || k > E) shape_error(op, "k = " + std::to_string(k) + " must be in [1, E = " + std::to_string(E) + "]");
  if (bias) {
    need_float_on(op, dev, "bias", *bias);
    if (bias->numel() != E) shape_error(op, describe("bias", *bias) + ": expected [E = " + std::to_string(E) + "]");
  }
  const bool grouped = o.group != GroupedRouterOptions::Group::None;
  const int64_t G = grouped ? o.n_group : 1, per = E / G;
  if (grouped && (G < 1 || E % G != 0 || o.topk_group < 1 || o.topk_group > G || k > o.topk_group * per ||
                  (o.group == GroupedRouterOptions::Group::Top2Sum && per < 2)))
    shape_error(op, "bad grouping: E = " + std::to_string(E) + ", n_group = " + std::to_string(o.n_group) +
                        ", topk_group = " + std::to_string(o.topk_group) + ", k = " + std::to_string(k));
  if (dev == DeviceType::CUDA) {
#ifdef AM_WITH_CUDA
    return cuda::moe_router_grouped_fwd(logits, bias, k, o, scores, topk_idx, topk_w);
#else
    no_cuda_build(op);
#endif
  }
  const float* l = logits.f32();
  const float* b = bias ? bias->f32() : nullptr;
  float* p = scores.f32();
  int32_t* idx = topk_idx.data<int32_t>();
  float* w = topk_w.f32();
  std::vector<float> choice(static_cast<size_t>(E)), gs(static_cast<size_t>(G));
  std::vector<int32_t> gidx(static_cast<size_t>(std::max<int64_t>(o.topk_group, 1))), top2(2);
  for (int64_t t = 0; t < N; ++t) {
    const float* lt = l + t * E;
    float* pt = p + t * E;
    if (o.sigmoid) {
      for (int64_t e = 0; e < E; ++e) pt[e] = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(lt[e]))));
    } else {
      float mx = -INFINITY;
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, lt[e]);
      double sum = 0.0;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(lt[e]) - mx);
      for (int64_t e = 0; e < E; ++e) pt[e] = static_cast<float>(std::exp(static_cast<double>(lt[e]) - mx) / sum);
    }
    for (int64_t e = 0; e < E; ++e) choice[static_cast<size_t>(e)] = b ? pt[e] + b[e] : pt[e];
    if (grouped) {
      for (int64_t g = 0; g < G; ++g) {
        const float* c = choice.data() + g * per;
        if (o.group == GroupedRouterOptions::Group::Top2Sum) {
          topk_desc(c, per, 2, top2.data());
          gs[static_cast<size_t>(g)] = c[top2[0]] + c[top2[1]];
        } else {
          gs[static_cast<size_t>(g)] = *std::max_element(c, c + per);
        }
      }
      topk_desc(gs.data(), G, o.topk_group, gidx.data());
      std::vector<char> keep(static_cast<size_t>(G), 0);
      for (int64_t i = 0; i < o.topk_group; ++i) keep[static_cast<size_t>(gidx[static_cast<size_t>(i)])] = 1;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[static_cast<size_t>(e / per)]) choice[static_cast<size_t>(e)] = 0.0f;
    }
    int32_t* it = idx + t * k;
    float* wt = w + t * k;
    topk_desc(choice.data(), E, k, it);
    float sum = 0.f;
    for (int64_t s = 0; s < k; ++s) {
      wt[s] = pt[it[s]];
      sum += wt[s];
    }
    const float den = sum + 1e-20f;
    for (int64_t s = 0; s < k; ++s) {
      if (o.norm_topk_prob) wt[s] = wt[s] / den;
      wt[s] = wt[s] * o.routed_scaling_factor;
    }
  }
}

void moe_router_grouped_bwd(const Tensor& scores, const Tensor& topk_idx, const GroupedRouterOptions& o,
                            const Tensor& dtopk_w, Tensor& dlogits) {
  const char* op = "moe_router_grouped_bwd";
  const DeviceType dev = device_of(op, {{"scores", &scores}, {"topk_idx", &topk_idx}, {"dtopk_w", &dtopk_w},
                                        {"dlogits", &dlogits}});
  need_f32(op, "scores", scores);
  need_f32(op, "dtopk_w", dtopk_w);
  need_float_on(op, dev, "dlogits", dlogits);
  if (scores.ndim() != 2 || topk_idx.ndim() != 2)
    shape_error(op, describe("scores", scores) + ", " + describe("topk_idx", topk_idx) + ": expected [N, E] and [N, k]");
  const int64_t N = scores.dim(0), E = scores.dim(1), k = topk_idx.dim(1);
  if (dlogits.shape() != scores.shape() || topk_idx.dtype() != DType::I32 || topk_idx.dim(0) != N ||
      dtopk_w.shape() != topk_idx.shape())
    shape_error(op, describe("scores", scores) + ", " + describe("topk_idx", topk_idx) + ", " +
                        describe("dtopk_w", dtopk_w) + ", " + describe("dlogits", dlogits) + ": shapes disagree");
  if (dev == DeviceType::CUDA) {
#ifdef AM_WITH_CUDA
    return cuda::moe_router_grouped_bwd(scores, topk_idx, o, dtopk_w, dlogits);
#else
    no_cuda_build(op);
#endif
  }
  const float* p = scores.f32();
  const int32_t* idx = topk_idx.data<int32_t>();
  const float* dw = dtopk_w.f32();
  float* dl = dlogits.f32();
  const double r = o.routed_scaling_factor;
  std::vector<double> du(static_cast<size_t>(E));
  for (int64_t t = 0; t < N; ++t) {
    const float* pt = p + t * E;
    const int32_t* it = idx + t * k;
    const float* dwt = dw + t * k;
    std::fill(du.begin(), du.end(), 0.0);
    double S = 1.0, c = 0.0;
    if (o.norm_topk_prob) {
      S = 1e-20;
      for (int64_t s = 0; s < k; ++s) S += pt[it[s]];
      for (int64_t s = 0; s < k; ++s) c += static_cast<double>(dwt[s]) * pt[it[s]];
      c /= S;
    }
    for (int64_t s = 0; s < k; ++s) {
      if (it[s] < 0 || it[s] >= E) throw DataError(std::string("op ") + op + ": expert index out of range");
      du[static_cast<size_t>(it[s])] += r / S * (dwt[s] - c);
    }
    float* dlt = dl + t * E;
    if (o.sigmoid) {
      for (int64_t e = 0; e < E; ++e) dlt[e] = static_cast<float>(du[static_cast<size_t>(e)] * pt[e] * (1.0 - pt[e]));
    } else {
      double dot = 0.0;
      for (int64_t e = 0; e < E; ++e) dot += pt[e] * du[static_cast<size_t>(e)];
      for (int64_t e = 0; e < E; ++e) dlt[e] = static_cast<float>(pt[e] * (du[static_cast<size_t>(e)] - dot));
    }
  }
}

}  // namespace am::ops
