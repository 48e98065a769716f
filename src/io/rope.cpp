// RoPE inverse frequencies as transformers' ROPE_INIT_FUNCTIONS compute them (modeling_rope_utils.py), op for
// op in float32 where torch works on float32 tensors and in double where it works on Python floats:
//   - a Python scalar meeting a float32 tensor is rounded to float32 first (torch's wrapped-number rule);
//   - `s / t` on a tensor is `t.reciprocal() * s` (Tensor.__rtruediv__), i.e. (1/t) then a multiply;
//   - `base ** t` is powf(float(base), t); we compute it correctly rounded (torch's vectorised powf is within
//     1 ulp of that), which is the only place where a result may differ from torch, by at most 1 ulp.
// Contraction into FMAs would change roundings, so it is turned off for this file.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"
#include "io/model_config.h"

namespace am::io {

namespace {

float powf_cr(float base, float e) {
  return static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(e)));
}

// base ** (arange(0, dim, 2).float() / dim): [ceil(dim/2)] float32
std::vector<float> pos_freqs(double theta, int64_t dim) {
  std::vector<float> p(static_cast<size_t>((dim + 1) / 2));
  const float base = static_cast<float>(theta), fdim = static_cast<float>(dim);
  for (size_t i = 0; i < p.size(); ++i) p[i] = powf_cr(base, static_cast<float>(2 * i) / fdim);
  return p;
}

// yarn's get_mscale, in Python floats.
double get_mscale(double scale, double mscale = 1.0) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

void llama3(const RopeParams& r, std::vector<float>& inv) {
  const double old_ctx = static_cast<double>(r.original_max_position_embeddings);
  const float low_wavelen = static_cast<float>(old_ctx / r.low_freq_factor);    // compared as float32
  const float high_wavelen = static_cast<float>(old_ctx / r.high_freq_factor);
  const float two_pi = static_cast<float>(2 * std::numbers::pi);
  const float factor = static_cast<float>(r.factor), lf = static_cast<float>(r.low_freq_factor);
  const float span = static_cast<float>(r.high_freq_factor - r.low_freq_factor), ctx = static_cast<float>(old_ctx);
  for (float& f : inv) {
    const float wavelen = (1.0f / f) * two_pi;
    const float scaled = wavelen > low_wavelen ? f / factor : f;           // low frequencies: divided by factor
    const float smooth = ((1.0f / wavelen) * ctx - lf) / span;
    const float smoothed = (1.0f - smooth) * scaled / factor + smooth * scaled;
    const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
    f = medium ? smoothed : scaled;
  }
}

float yarn(const RopeParams& r, int64_t dim, std::vector<float>& inv) {
  const double factor = r.factor;
  double attention = 1.0;
  if (r.attention_factor) attention = *r.attention_factor;
  else if (r.mscale && *r.mscale != 0 && r.mscale_all_dim && *r.mscale_all_dim != 0)
    attention = get_mscale(factor, *r.mscale) / get_mscale(factor, *r.mscale_all_dim);
  else attention = get_mscale(factor);

  // Dimension index at which a frequency completes `rot` rotations over the original context.
  auto correction_dim = [&](double rot) {
    return (static_cast<double>(dim) * std::log(static_cast<double>(r.original_max_position_embeddings) /
                                                (rot * 2 * std::numbers::pi))) /
           (2 * std::log(r.rope_theta));
  };
  double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
  if (r.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // avoids a division by zero in the ramp
  const float flow = static_cast<float>(low), frange = static_cast<float>(high - low);

  const std::vector<float> pf = pos_freqs(r.rope_theta, dim);
  const float ffactor = static_cast<float>(factor);
  for (size_t i = 0; i < inv.size(); ++i) {
    const float extrapolation = 1.0f / pf[i];
    const float interpolation = 1.0f / (pf[i] * ffactor);
    float ramp = (static_cast<float>(i) - flow) / frange;
    ramp = std::min(std::max(ramp, 0.0f), 1.0f);
    const float extra_w = 1.0f - ramp;  // 1 for the high frequencies (kept), 0 for the low ones (interpolated)
    inv[i] = interpolation * (1.0f - extra_w) + extrapolation * extra_w;
  }
  return static_cast<float>(attention);
}

// LongRoPE (Phi-3): inv_freq = 1 / (ext * base ** (arange(0, dim, 2) / dim)), ext = short_factor, or
// long_factor past original_max_position_embeddings; the product is a float32 tensor op, then its reciprocal.
float longrope(const RopeParams& r, int64_t dim, RopeTables& t) {
  const size_t half = static_cast<size_t>(dim / 2);
  for (const auto* f : {&r.short_factor, &r.long_factor})
    if (f->size() != half)
      throw FormatError("rope_scaling: longrope short_factor / long_factor must have rotary_dim / 2 = " +
                        std::to_string(half) + " entries, got " + std::to_string(f->size()));
  const std::vector<float> pf = pos_freqs(r.rope_theta, dim);
  t.inv_freq.assign(half, 0.f);
  t.inv_freq_long.assign(half, 0.f);
  for (size_t i = 0; i < half; ++i) {
    t.inv_freq[i] = 1.0f / (static_cast<float>(r.short_factor[i]) * pf[i]);
    t.inv_freq_long[i] = 1.0f / (static_cast<float>(r.long_factor[i]) * pf[i]);
  }
  t.long_after = r.original_max_position_embeddings;
  if (r.attention_factor) return static_cast<float>(*r.attention_factor);
  if (r.factor <= 1.0) return 1.0f;
  return static_cast<float>(std::sqrt(1.0 + std::log(r.factor) / std::log(static_cast<double>(r.original_max_position_embeddings))));
}

}  // namespace

RopeTables compute_rope(const ModelConfig& cfg) {
  const RopeParams& r = cfg.rope;
  // int(head_dim * partial_rotary_factor), truncating as Python's int() does.
  const int64_t dim = static_cast<int64_t>(static_cast<double>(cfg.head_dim) * r.partial_rotary_factor);
  if (dim <= 0 || dim % 2 != 0)
    throw FormatError("rotary dimension " + std::to_string(dim) + " (head_dim " + std::to_string(cfg.head_dim) +
                      " x partial_rotary_factor) must be positive and even");
  RopeTables t;
  t.inv_freq = pos_freqs(r.rope_theta, dim);
  for (float& f : t.inv_freq) f = 1.0f / f;

  const std::string& type = r.rope_type;
  if (type == "default" || type == "dynamic") {
    // dynamic NTK equals default up to max_position_embeddings (its base multiplier is 1 there).
  } else if (type == "linear") {
    const float factor = static_cast<float>(r.factor);
    for (float& f : t.inv_freq) f /= factor;
  } else if (type == "llama3") {
    llama3(r, t.inv_freq);
  } else if (type == "yarn") {
    t.attention_scaling = yarn(r, dim, t.inv_freq);
  } else if (type == "longrope") {
    t.attention_scaling = longrope(r, dim, t);
  } else {
    throw FormatError("RoPE type '" + type + "' is not supported (default, linear, dynamic, llama3, yarn, longrope)");
  }
  return t;
}

void rope_cos_sin(const RopeTables& t, const int32_t* positions, int64_t n, float* cos_out, float* sin_out) {
  const size_t half = t.inv_freq.size();
  const float scale = t.attention_scaling;
  int64_t max_pos = -1;
  for (int64_t p = 0; p < n; ++p) max_pos = std::max<int64_t>(max_pos, positions[p]);
  const std::vector<float>& inv = !t.inv_freq_long.empty() && max_pos + 1 > t.long_after ? t.inv_freq_long : t.inv_freq;
  for (int64_t p = 0; p < n; ++p) {
    const float pos = static_cast<float>(positions[p]);
    float* c = cos_out + p * static_cast<int64_t>(half);
    float* s = sin_out + p * static_cast<int64_t>(half);
    for (size_t i = 0; i < half; ++i) {
      // HF: freqs = inv_freq @ position (a float32 product), cos()/sin() in float32, then * attention_scaling.
      const double angle = static_cast<double>(inv[i] * pos);
      c[i] = static_cast<float>(std::cos(angle)) * scale;
      s[i] = static_cast<float>(std::sin(angle)) * scale;
    }
  }
}

}  // namespace am::io
