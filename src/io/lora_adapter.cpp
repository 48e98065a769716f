// HF PEFT LoRA adapter reader and the merge rule of PEFT's merge_and_unload() (see lora_adapter.h for the
// exact arithmetic and where in PEFT each step comes from).
//
// The arithmetic below must stay bit-exact with the rule in the header: every fp32 step is its own statement
// and contraction into FMA is switched off for this file (an FMA would skip the fp32 rounding of B@A or of
// the product by scale, and a fused double multiply-add would change the accumulation). O3 vectorizes the
// column loops (independent columns; no reassociation, which would need -ffast-math): 1.35x less CPU time
// than -O2 on the merge of 8 [8192, 8192] bf16 weights at r=16.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3", "fp-contract=off")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

#include "io/lora_adapter.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_bounded.h"

namespace am::io {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

std::string q(const std::string& s) { return "'" + s + "'"; }

bool is_float(DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; }

// torch's cast to `d` and back: the value a `d` tensor holds.
inline float round_to(float v, DType d) {
  switch (d) {
    case DType::BF16: return bf16_to_f32(f32_to_bf16(v));
    case DType::F16: return f16_to_f32(f32_to_f16(v));
    default: return v;
  }
}

std::vector<float> to_f32(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  if (!v.empty()) convert_floats(t.raw(), t.dtype(), v.data(), DType::F32, v.size());
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Merge core. W is stored [rows, cols]. Not transposed (Linear): rows = out, cols = in, and
// delta[o][i] = sum_k B[o,k] A[k,i]. Transposed (fan_in_fan_out Linear, Embedding): rows = in (or
// num_embeddings), cols = out (or embedding_dim), and delta[i][o] = sum_k A[k,i] B[o,k].
struct Prepared {
  int64_t r = 0, rows = 0, cols = 0;
  bool transposed = false;
  std::vector<float> A;   // [r, in] as given
  std::vector<float> Bm;  // not transposed: B [out, r]; transposed: B^T [r, out]
  float scale = 1.f;      // fp32(scale), the value torch multiplies the fp32 B@A by
};

Prepared prepare(const LoraWeights& w) {
  Prepared p;
  p.r = w.A.dim(0);
  p.A = to_f32(w.A);
  std::vector<float> b = to_f32(w.B);  // [out, r]
  const int64_t out = w.B.dim(0), in = w.A.dim(1);
  p.transposed = w.kind == LoraKind::Embedding || w.fan_in_fan_out;
  if (p.transposed) {
    p.rows = in;
    p.cols = out;
    p.Bm.resize(b.size());
    for (int64_t o = 0; o < out; ++o)
      for (int64_t k = 0; k < p.r; ++k) p.Bm[k * out + o] = b[o * p.r + k];
  } else {
    p.rows = out;
    p.cols = in;
    p.Bm = std::move(b);
  }
  p.scale = static_cast<float>(w.scale);
  return p;
}

// delta row `row` of W's layout, in fp32: d[c] = fp32(fp32(sum_k ...) * fp32(scale)). `acc` has cols doubles.
// The sum runs k = 0..r-1 in double (each product of two floats is exact in double).
void delta_row(const Prepared& p, int64_t row, double* acc, float* d) {
  const int64_t r = p.r, cols = p.cols;
  for (int64_t c = 0; c < cols; ++c) acc[c] = 0.0;
  if (!p.transposed) {  // row = o: acc[i] += B[o,k] * A[k,i]
    for (int64_t k = 0; k < r; ++k) {
      const double b = p.Bm[row * r + k];
      const float* a = p.A.data() + k * cols;
      for (int64_t c = 0; c < cols; ++c) acc[c] += b * static_cast<double>(a[c]);
    }
  } else {  // row = i: acc[o] += A[k,i] * B[o,k]  (Bm = B^T [r, out]; A is [r, in], in = rows)
    for (int64_t k = 0; k < r; ++k) {
      const double a = p.A[k * p.rows + row];
      const float* bt = p.Bm.data() + k * cols;
      for (int64_t c = 0; c < cols; ++c) acc[c] += a * static_cast<double>(bt[c]);
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    const float ba = static_cast<float>(acc[c]);  // fp32(B @ A)
    d[c] = ba * p.scale;                          // fp32(... * scale)
  }
}

// The merge of the whole tensor: src [rows, cols] in sdt -> dst in ddt (dst may alias src when sdt == ddt:
// each row is read completely before it is written). Values of src are first taken as a ddt tensor holds them
// ("the base loaded in ddt").
void merge_all(const void* src, DType sdt, void* dst, DType ddt, const LoraWeights& w) {
  const Prepared p = prepare(w);
  const size_t ss = dtype_size(sdt), ds = dtype_size(ddt);
  const bool narrow = sdt != ddt;
  const bool embedding = w.kind == LoraKind::Embedding;
  const bool dora = w.magnitude.defined();
  const int64_t rows = p.rows, cols = p.cols;
  std::vector<float> mag = dora ? to_f32(w.magnitude) : std::vector<float>();
  auto load_row = [&](int64_t row, float* x) {
    convert_floats(static_cast<const char*>(src) + static_cast<size_t>(row * cols) * ss, sdt, x, DType::F32,
                   static_cast<size_t>(cols));
    if (narrow)
      for (int64_t c = 0; c < cols; ++c) x[c] = round_to(x[c], ddt);
  };
  auto store_row = [&](int64_t row, const float* x) {
    convert_floats(x, DType::F32, static_cast<char*>(dst) + static_cast<size_t>(row * cols) * ds, ddt,
                   static_cast<size_t>(cols));
  };

  // DoRA: the factor m / ||W + delta|| per output feature (dora.py get_weight_norm: the norm of fp32(W + delta)
  // over the input dimension, computed here in double and rounded to fp32; torch reduces in fp32).
  std::vector<float> factor;
  if (dora) {
    const int64_t out = p.transposed ? cols : rows;
    factor.assign(static_cast<size_t>(out), 0.f);
    std::vector<double> acc(static_cast<size_t>(cols));
    std::vector<float> x(static_cast<size_t>(cols)), d(static_cast<size_t>(cols));
    if (!p.transposed) {
#pragma omp parallel for schedule(static) firstprivate(acc, x, d)
      for (int64_t o = 0; o < rows; ++o) {
        load_row(o, x.data());
        delta_row(p, o, acc.data(), d.data());
        double ss2 = 0.0;
        for (int64_t c = 0; c < cols; ++c) {
          const float s = x[c] + d[c];
          ss2 += static_cast<double>(s) * static_cast<double>(s);
        }
        const float norm = static_cast<float>(std::sqrt(ss2));
        factor[o] = mag[o] / norm;
      }
    } else {  // norms over columns (W is [in, out]): one serial pass, rows in order
      std::vector<double> ss2(static_cast<size_t>(cols), 0.0);
      for (int64_t i = 0; i < rows; ++i) {
        load_row(i, x.data());
        delta_row(p, i, acc.data(), d.data());
        for (int64_t c = 0; c < cols; ++c) {
          const float s = x[c] + d[c];
          ss2[c] += static_cast<double>(s) * static_cast<double>(s);
        }
      }
      for (int64_t c = 0; c < cols; ++c) factor[c] = mag[c] / static_cast<float>(std::sqrt(ss2[c]));
    }
  }

  std::vector<double> acc(static_cast<size_t>(cols));
  std::vector<float> x(static_cast<size_t>(cols)), d(static_cast<size_t>(cols));
#pragma omp parallel for schedule(static) firstprivate(acc, x, d)
  for (int64_t row = 0; row < rows; ++row) {
    load_row(row, x.data());
    delta_row(p, row, acc.data(), d.data());
    if (dora) {
      for (int64_t c = 0; c < cols; ++c) {
        const float s = x[c] + d[c];                          // fp32(W + delta)
        const float f = factor[p.transposed ? c : row];
        x[c] = f * s;                                         // fp32(factor * (W + delta)), rounded on store
      }
    } else if (embedding) {
      for (int64_t c = 0; c < cols; ++c) {
        const float dd = round_to(d[c], ddt);                 // delta.to(orig_dtype)
        x[c] = x[c] + dd;
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) x[c] = x[c] + d[c];  // fp32(W + delta), rounded once on store
    }
    store_row(row, x.data());
  }
}

void check_float(const Tensor& t, const std::string& what) {
  if (!t.defined()) throw ShapeError(what + ": tensor is undefined");
  if (t.device() != DeviceType::CPU) throw ShapeError(what + ": tensor must be on the host");
  if (!is_float(t.dtype()))
    throw FormatError(what + ": dtype " + dtype_name(t.dtype()) + " is not a float dtype (F32/BF16/F16)");
}

// ---------------------------------------------------------------------------------------------------------
// Python `re` patterns through PCRE2 (the subset adapter configs use: literals, '.', classes, groups, |, ?*+).
bool regex_match(const std::string& pattern, const std::string& subject, bool full, const std::string& where) {
  int err = 0;
  PCRE2_SIZE off = 0;
  // re.match(rf"(.*\.)?({key})$", s): anchored at the start, '$' at the end (or before a final newline, as
  // Python's). re.fullmatch(p, s): the whole string.
  const std::string pat = full ? "(?:" + pattern + ")\\z" : "(.*\\.)?(" + pattern + ")$";
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pat.data()), pat.size(), PCRE2_ANCHORED | PCRE2_UTF,
                                   &err, &off, nullptr);
  if (!code) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof(buf));
    throw FormatError(where + ": pattern " + q(pattern) + " is not a valid regular expression: " +
                      reinterpret_cast<char*>(buf));
  }
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
  int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(subject.data()), subject.size(), 0, 0, md, nullptr);
  pcre2_match_data_free(md);
  pcre2_code_free(code);
  return rc >= 0;
}

// PEFT's get_pattern_key (utils/other.py): the first key of the pattern dict, in file order, such that
// re.match(rf"(.*\.)?({key})$", module) matches.
const ojson* pattern_value(const ojson& pattern, const std::string& module, const std::string& where) {
  for (auto it = pattern.begin(); it != pattern.end(); ++it)
    if (regex_match(it.key(), module, false, where)) return &it.value();
  return nullptr;
}

// Does `module` match target_modules / exclude_modules (tuners_utils.check_target_module_exists)? A list
// matches by name or dotted suffix, a string by re.fullmatch. nullopt: cannot tell ("all-linear").
std::optional<bool> selects(const ojson& spec, const std::string& module, const std::string& where) {
  if (spec.is_null()) return std::nullopt;
  if (spec.is_string()) {
    const std::string s = spec.get<std::string>();
    if (s == "all-linear") return std::nullopt;
    return regex_match(s, module, true, where);
  }
  if (spec.is_array()) {
    for (const auto& t : spec) {
      if (!t.is_string()) continue;
      const std::string n = t.get<std::string>();
      if (module == n || (module.size() > n.size() && module.ends_with("." + n))) return true;
    }
    return false;
  }
  return std::nullopt;
}

bool ends_with_strip(std::string& s, const std::string& suffix) {
  if (s.size() <= suffix.size() || !s.ends_with(suffix)) return false;
  s.resize(s.size() - suffix.size());
  return true;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t i = s.find(from); i != std::string::npos; i = s.find(from, i + to.size())) s.replace(i, from.size(), to);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------

Shape lora_base_shape(const LoraWeights& w) {
  const int64_t out = w.B.dim(0), in = w.A.dim(1);
  if (w.kind == LoraKind::Embedding || w.fan_in_fan_out) return {in, out};
  return {out, in};
}

void check_lora_weights(const LoraWeights& w, const std::string& where) {
  check_float(w.A, where + " lora_A");
  check_float(w.B, where + " lora_B");
  if (w.A.ndim() != 2 || w.B.ndim() != 2 || w.A.dim(0) != w.B.dim(1) || w.A.dim(0) <= 0)
    throw ShapeError(where + ": lora_A " + shape_str(w.A.shape()) + " and lora_B " + shape_str(w.B.shape()) +
                     " do not form a LoRA pair (A [r, in], B [out, r])");
  const int64_t out = w.B.dim(0);
  if (w.magnitude.defined()) {
    check_float(w.magnitude, where + " lora_magnitude_vector");
    if (w.kind == LoraKind::Embedding) throw UsageError(where + ": DoRA on an embedding is not supported by the merge");
    if (w.magnitude.numel() != out)
      throw ShapeError(where + ": lora_magnitude_vector " + shape_str(w.magnitude.shape()) + " does not match lora_B " +
                       shape_str(w.B.shape()) + " (want [" + std::to_string(out) + "])");
  }
  if (w.bias.defined()) {
    check_float(w.bias, where + " lora_B.bias");
    if (w.bias.numel() != out)
      throw ShapeError(where + ": lora_B.bias " + shape_str(w.bias.shape()) + " does not match lora_B " +
                       shape_str(w.B.shape()));
  }
}

Tensor merge_lora_weight(const Tensor& base, const LoraWeights& w, DType out_dtype) {
  check_lora_weights(w, "merge_lora_weight");
  check_float(base, "merge_lora_weight base");
  if (!is_float(out_dtype)) throw ShapeError(std::string("merge_lora_weight: output dtype ") + dtype_name(out_dtype) + " is not a float dtype");
  if (base.shape() != lora_base_shape(w))
    throw ShapeError("merge_lora_weight: base weight " + shape_str(base.shape()) + " does not match the LoRA pair (A " +
                     shape_str(w.A.shape()) + ", B " + shape_str(w.B.shape()) + ": want " +
                     shape_str(lora_base_shape(w)) + ")");
  Tensor out = Tensor::empty(base.shape(), out_dtype);
  merge_all(base.raw(), base.dtype(), out.raw(), out_dtype, w);
  return out;
}

void merge_lora_weight_inplace(Tensor& base, const LoraWeights& w) {
  check_lora_weights(w, "merge_lora_weight");
  check_float(base, "merge_lora_weight base");
  if (base.shape() != lora_base_shape(w))
    throw ShapeError("merge_lora_weight: base weight " + shape_str(base.shape()) + " does not match the LoRA pair (want " +
                     shape_str(lora_base_shape(w)) + ")");
  merge_all(base.raw(), base.dtype(), base.raw(), base.dtype(), w);
}

Tensor merge_lora_bias(const Tensor& base_bias, const LoraWeights& w, DType out_dtype) {
  check_float(base_bias, "merge_lora_bias base");
  check_float(w.bias, "merge_lora_bias lora_B.bias");
  if (base_bias.numel() != w.bias.numel())
    throw ShapeError("merge_lora_bias: base bias " + shape_str(base_bias.shape()) + " does not match lora_B.bias " +
                     shape_str(w.bias.shape()));
  std::vector<float> b = to_f32(base_bias), lb = to_f32(w.bias);
  const float s = static_cast<float>(w.scale);
  for (size_t i = 0; i < b.size(); ++i) {
    const float x = base_bias.dtype() == out_dtype ? b[i] : round_to(b[i], out_dtype);
    const float add = lb[i] * s;  // fp32(lora_B.bias * scaling)
    b[i] = x + add;               // fp32 sum, rounded once below
  }
  Tensor out = Tensor::empty(base_bias.shape(), out_dtype);
  convert_floats(b.data(), DType::F32, out.raw(), out_dtype, b.size());
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Expert parameters (PEFT's ParamWrapper): delta[e][o][i] = fp32(fp32(sum_k B[o, k·E + e] A[e·r + k, i]) * scale)

namespace {

std::string expert_name(const LoraExpertParam& p) { return p.target.empty() ? p.module + "." + p.param : p.target; }

struct ExpertPrepared {
  int64_t r = 0, E = 0, out = 0, in = 0;
  int64_t e0 = 0, n = 0;  // the experts prepared: [e0, e0 + n)
  std::vector<float> A;   // A_e of those experts: rows [e·r, e·r + r) of A, expert e at (e - e0)·r·in
  std::vector<float> B;   // B_e of those experts, regrouped: B[((e - e0)·out + o)·r + k] = B[o, k·E + e]
  float scale = 1.f;
};

// Only the experts [e0, e0 + n) (a per-expert base tensor needs one: not the whole pair converted each time).
ExpertPrepared prepare_expert(const LoraExpertParam& p, int64_t e0, int64_t n) {
  ExpertPrepared x;
  x.r = p.r;
  x.E = p.num_experts;
  x.out = p.B.dim(0);
  x.in = p.A.dim(1);
  x.e0 = e0;
  x.n = n;
  x.A.resize(static_cast<size_t>(n * x.r * x.in));
  if (!x.A.empty())
    convert_floats(static_cast<const char*>(p.A.raw()) + static_cast<size_t>(e0 * x.r * x.in) * dtype_size(p.A.dtype()),
                   p.A.dtype(), x.A.data(), DType::F32, x.A.size());
  const int64_t rE = x.r * x.E;
  const size_t bs = dtype_size(p.B.dtype());
  const char* b = static_cast<const char*>(p.B.raw());
  x.B.resize(static_cast<size_t>(n * x.out * x.r));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t o = 0; o < x.out; ++o)
      for (int64_t k = 0; k < x.r; ++k)
        convert_floats(b + static_cast<size_t>(o * rE + k * x.E + e0 + j) * bs, p.B.dtype(),
                       &x.B[static_cast<size_t>((j * x.out + o) * x.r + k)], DType::F32, 1);
  x.scale = static_cast<float>(p.scale);
  return x;
}

// Row o of delta[e] into d (in floats); acc has `in` doubles. k ascending, in double, as delta_row.
void expert_delta_row(const ExpertPrepared& x, int64_t e, int64_t o, double* acc, float* d) {
  const int64_t in = x.in, r = x.r;
  for (int64_t i = 0; i < in; ++i) acc[i] = 0.0;
  const float* bt = x.B.data() + ((e - x.e0) * x.out + o) * r;
  for (int64_t k = 0; k < r; ++k) {
    const double b = bt[k];
    const float* a = x.A.data() + ((e - x.e0) * r + k) * in;
    for (int64_t i = 0; i < in; ++i) acc[i] += b * static_cast<double>(a[i]);
  }
  for (int64_t i = 0; i < in; ++i) {
    const float ba = static_cast<float>(acc[i]);  // fp32(B_e @ A_e)
    d[i] = ba * x.scale;                          // fp32(... * scale)
  }
}

// src holds n_exp experts (from e_first) of `rows` rows (from row0) of `in` columns each, in sdt; the merged
// rows go to dst in ddt (dst may alias src when sdt == ddt: each row is read before it is written).
void merge_expert_rows(const void* src, DType sdt, void* dst, DType ddt, const LoraExpertParam& p, int64_t e_first,
                       int64_t n_exp, int64_t row0, int64_t rows) {
  const ExpertPrepared x = prepare_expert(p, e_first, n_exp);
  const size_t ss = dtype_size(sdt), ds = dtype_size(ddt);
  const bool narrow = sdt != ddt;
  const int64_t in = x.in, total = n_exp * rows;
  std::vector<double> acc(static_cast<size_t>(in));
  std::vector<float> w(static_cast<size_t>(in)), d(static_cast<size_t>(in));
#pragma omp parallel for schedule(static) firstprivate(acc, w, d)
  for (int64_t j = 0; j < total; ++j) {
    const int64_t e = e_first + j / rows, o = row0 + j % rows;
    convert_floats(static_cast<const char*>(src) + static_cast<size_t>(j * in) * ss, sdt, w.data(), DType::F32,
                   static_cast<size_t>(in));
    if (narrow)
      for (int64_t i = 0; i < in; ++i) w[i] = round_to(w[i], ddt);  // the base as loaded in ddt
    expert_delta_row(x, e, o, acc.data(), d.data());
    for (int64_t i = 0; i < in; ++i) {
      const float dd = round_to(d[i], ddt);  // delta_weight.to(param.dtype)
      w[i] = w[i] + dd;                      // param.data += delta_weight: fp32 sum, rounded on store
    }
    convert_floats(w.data(), DType::F32, static_cast<char*>(dst) + static_cast<size_t>(j * in) * ds, ddt,
                   static_cast<size_t>(in));
  }
}

// The experts and rows of parameter p that a base tensor of `shape` holds (expert -1: all of them); throws
// ShapeError naming `what` when the shape does not fit.
void expert_block(const LoraExpertParam& p, const Shape& shape, int64_t expert, int64_t row0, const std::string& what,
                  int64_t* e_first, int64_t* n_exp, int64_t* rows) {
  const int64_t E = p.num_experts, out = p.B.dim(0), in = p.A.dim(1);
  if (expert < 0) {
    const bool ok = row0 == 0 && (shape == Shape{E, out, in} || (E == 1 && shape == Shape{out, in}));
    if (!ok)
      throw ShapeError(what + ": base " + shape_str(shape) + " does not match the expert LoRA pair of " + expert_name(p) +
                       " (A " + shape_str(p.A.shape()) + ", B " + shape_str(p.B.shape()) + ", r " + std::to_string(p.r) +
                       ": want the fused " + shape_str({E, out, in}) + ")");
    *e_first = 0;
    *n_exp = E;
    *rows = out;
    return;
  }
  if (expert >= E)
    throw ShapeError(what + ": expert " + std::to_string(expert) + " of " + expert_name(p) + ", which has " +
                     std::to_string(E) + " experts (lora_A " + shape_str(p.A.shape()) + " at rank " + std::to_string(p.r) + ")");
  if (shape.size() != 2 || shape[1] != in || row0 < 0 || shape[0] <= 0 || row0 + shape[0] > out)
    throw ShapeError(what + ": base " + shape_str(shape) + " does not match rows [" + std::to_string(row0) + ", ...) of expert " +
                     std::to_string(expert) + " of " + expert_name(p) + " (delta [" + std::to_string(out) + ", " +
                     std::to_string(in) + "] per expert)");
  *e_first = expert;
  *n_exp = 1;
  *rows = shape[0];
}

}  // namespace

Shape lora_expert_base_shape(const LoraExpertParam& p) { return {p.num_experts, p.B.dim(0), p.A.dim(1)}; }

void check_lora_expert_param(const LoraExpertParam& p, const std::string& where) {
  check_float(p.A, where + " lora_A");
  check_float(p.B, where + " lora_B");
  if (p.A.ndim() != 2 || p.B.ndim() != 2 || p.r <= 0 || p.num_experts <= 0 || p.A.dim(0) != p.r * p.num_experts ||
      p.B.dim(1) != p.A.dim(0))
    throw ShapeError(where + ": lora_A " + shape_str(p.A.shape()) + " and lora_B " + shape_str(p.B.shape()) +
                     " do not form an expert LoRA pair of rank " + std::to_string(p.r) + " over " +
                     std::to_string(p.num_experts) + " experts (A [r·E, in], B [out, r·E])");
}

Tensor expert_delta(const LoraExpertParam& p, int64_t e) {
  check_lora_expert_param(p, "expert_delta " + expert_name(p));
  if (e < 0 || e >= p.num_experts)
    throw ShapeError("expert_delta " + expert_name(p) + ": expert " + std::to_string(e) + " out of [0, " +
                     std::to_string(p.num_experts) + ")");
  const ExpertPrepared x = prepare_expert(p, e, 1);
  Tensor out = Tensor::empty({x.out, x.in}, DType::F32);
  std::vector<double> acc(static_cast<size_t>(x.in));
  for (int64_t o = 0; o < x.out; ++o) expert_delta_row(x, e, o, acc.data(), out.f32() + o * x.in);
  return out;
}

Tensor merge_lora_expert(const Tensor& base, const LoraExpertParam& p, int64_t expert, int64_t row0, DType out_dtype) {
  check_lora_expert_param(p, "merge_lora_expert " + expert_name(p));
  check_float(base, "merge_lora_expert base");
  if (!is_float(out_dtype))
    throw ShapeError(std::string("merge_lora_expert: output dtype ") + dtype_name(out_dtype) + " is not a float dtype");
  int64_t e0 = 0, n = 0, rows = 0;
  expert_block(p, base.shape(), expert, row0, "merge_lora_expert", &e0, &n, &rows);
  Tensor out = Tensor::empty(base.shape(), out_dtype);
  merge_expert_rows(base.raw(), base.dtype(), out.raw(), out_dtype, p, e0, n, expert < 0 ? 0 : row0, rows);
  return out;
}

void merge_lora_expert_inplace(Tensor& base, const LoraExpertParam& p, int64_t expert, int64_t row0) {
  check_lora_expert_param(p, "merge_lora_expert " + expert_name(p));
  check_float(base, "merge_lora_expert base");
  int64_t e0 = 0, n = 0, rows = 0;
  expert_block(p, base.shape(), expert, row0, "merge_lora_expert", &e0, &n, &rows);
  merge_expert_rows(base.raw(), base.dtype(), base.raw(), base.dtype(), p, e0, n, expert < 0 ? 0 : row0, rows);
}

// ---------------------------------------------------------------------------------------------------------
// Adapter folder

LoraAdapter LoraAdapter::load(const std::string& dir_in) {
  LoraAdapter ad;
  std::error_code ec;
  ad.dir = dir_in;
  const fs::path d(dir_in);
  if (!fs::is_directory(d, ec)) {
    if (fs::exists(d, ec)) throw IoError(dir_in + ": the adapter must be a folder (with adapter_config.json), not a file");
    throw IoError(dir_in + ": adapter folder not found");
  }
  ad.config_path = (d / "adapter_config.json").string();
  ad.weights_path = (d / "adapter_model.safetensors").string();
  if (!fs::exists(ad.config_path, ec))
    throw IoError(ad.config_path + ": not found (an HF PEFT adapter folder holds adapter_config.json and "
                  "adapter_model.safetensors)");
  if (!fs::exists(ad.weights_path, ec)) {
    if (fs::exists(d / "adapter_model.bin", ec))
      throw IoError((d / "adapter_model.bin").string() +
                    ": adapters saved as PyTorch pickle (.bin) are not read (unsafe to load, and needs Python); "
                    "re-save the adapter with safetensors (PEFT: save_pretrained(..., safe_serialization=True))");
    throw IoError(ad.weights_path + ": not found");
  }

  // ---- adapter_config.json (ordered: rank_pattern / alpha_pattern are matched in file order, as PEFT's dicts)
  std::string text;
  {
    std::ifstream f(ad.config_path, std::ios::binary);
    if (!f) throw IoError(ad.config_path + ": cannot read");
    std::stringstream ss;
    ss << f.rdbuf();
    text = ss.str();
  }
  const std::string cp = ad.config_path;
  ojson cfg = parse_json_bounded<ojson>(text, cp);
  if (!cfg.is_object()) throw FormatError(cp + ": must be a JSON object");
  auto get = [&](const char* k) -> const ojson* {
    auto it = cfg.find(k);
    return it == cfg.end() || it->is_null() ? nullptr : &*it;
  };
  auto get_bool = [&](const char* k, bool def) {
    const ojson* v = get(k);
    if (!v) return def;
    if (!v->is_boolean()) throw FormatError(cp + ": key " + q(k) + ": expected true or false, got " + v->dump());
    return v->get<bool>();
  };
  auto num = [&](const ojson& v, const std::string& what) -> double {
    if (!v.is_number()) throw FormatError(cp + ": " + what + ": expected a number, got " + v.dump());
    return v.get<double>();
  };
  auto rank_of = [&](const ojson& v, const std::string& what) -> int64_t {
    if (!v.is_number_integer() || v.get<int64_t>() <= 0)
      throw FormatError(cp + ": " + what + ": expected a positive integer, got " + v.dump());
    return v.get<int64_t>();
  };
  auto unsupported = [&](const std::string& key, const std::string& why) {
    throw UsageError(cp + ": " + key + ": " + why);
  };

  const ojson* pt = get("peft_type");
  if (!pt) throw FormatError(cp + ": missing key 'peft_type' (every PEFT adapter config has it; want \"LORA\")");
  if (!pt->is_string() || pt->get<std::string>() != "LORA")
    unsupported("peft_type " + pt->dump(), "only LoRA adapters (\"LORA\") can be merged");
  if (const ojson* v = get("base_model_name_or_path"); v && v->is_string()) ad.base_model_name_or_path = v->get<std::string>();

  const int64_t r_default = get("r") ? rank_of(*get("r"), "key 'r'") : 8;  // LoraConfig defaults: r=8, lora_alpha=8
  const double alpha_default = get("lora_alpha") ? num(*get("lora_alpha"), "key 'lora_alpha'") : 8.0;
  ad.use_rslora = get_bool("use_rslora", false);
  ad.use_dora = get_bool("use_dora", false);
  const bool fan_in_fan_out = get_bool("fan_in_fan_out", false);
  const bool lora_bias = get_bool("lora_bias", false);
  if (get_bool("use_alora", false) || get("alora_invocation_tokens"))
    unsupported("use_alora", "aLoRA adapters only act after their invocation tokens, so they cannot be merged into "
                "the weights");
  if (get_bool("use_qalora", false)) unsupported("use_qalora", "QALoRA adapters are not supported by the merge");
  // target_parameters: LoRA on raw (fused MoE expert) parameters, PEFT's ParamWrapper. PEFT refuses to build
  // one with dropout, fan_in_fan_out, lora_bias or DoRA (ParamWrapper.__init__), so no such adapter exists.
  std::vector<std::string> target_parameters;
  if (const ojson* v = get("target_parameters")) {
    if (!v->is_array()) throw FormatError(cp + ": key 'target_parameters': expected a list of parameter names, got " + v->dump());
    for (const auto& t : *v) {
      if (!t.is_string() || t.get<std::string>().empty() || t.get<std::string>().back() == '.')
        throw FormatError(cp + ": key 'target_parameters': expected parameter names, got " + t.dump());
      target_parameters.push_back(t.get<std::string>());
    }
  }
  if (!target_parameters.empty()) {
    for (const char* k : {"use_dora", "lora_bias", "fan_in_fan_out"})
      if (get_bool(k, false))
        unsupported(k, std::string("PEFT's ParamWrapper (target_parameters) does not work with ") + k +
                    ", so PEFT cannot have made this adapter");
  }
  if (get("trainable_token_indices"))
    unsupported("trainable_token_indices", "trainable-token adapters are not supported by the merge");
  if (const ojson* v = get("layer_replication"); v && !(v->is_array() && v->empty()))
    unsupported("layer_replication", "adapters that replicate layers change the model's structure; not supported");
  if (get("arrow_config")) unsupported("arrow_config", "Arrow routing between adapters cannot be merged");
  // LoRA variants whose weights are not W + scale * B @ A (peft/tuners/lora/config.py): KaSA (a singular-value
  // diagonal between A and B, and a truncated base), BD-LoRA (block-diagonal factors), MonteCLoRA (sampled).
  if (get("kasa_config")) unsupported("kasa_config", "KaSA adapters are not supported by the merge");
  if (get("use_bdlora")) unsupported("use_bdlora", "BD-LoRA (block-diagonal) adapters are not supported by the merge");
  if (get("monteclora_config")) unsupported("monteclora_config", "MonteCLoRA adapters are not supported by the merge");
  if (const ojson* v = get("bias"); v) {
    if (!v->is_string() || (v->get<std::string>() != "none" && v->get<std::string>() != "all" &&
                            v->get<std::string>() != "lora_only"))
      throw FormatError(cp + ": key 'bias': expected \"none\", \"all\" or \"lora_only\", got " + v->dump());
  }
  if (const ojson* v = get("init_lora_weights"); v && v->is_string()) {
    const std::string s = v->get<std::string>();
    if (s.rfind("pissa", 0) == 0 || s.rfind("corda", 0) == 0 || s == "olora")
      ad.warnings.push_back(cp + ": init_lora_weights \"" + s + "\": such an adapter is relative to the residual base "
                            "it was initialised from (unless it was converted on save); merging it into the original "
                            "base is only right for a converted adapter");
  }
  const ojson empty_obj = ojson::object();
  const ojson* rank_pattern = get("rank_pattern") ? get("rank_pattern") : &empty_obj;
  const ojson* alpha_pattern = get("alpha_pattern") ? get("alpha_pattern") : &empty_obj;
  if (!rank_pattern->is_object()) throw FormatError(cp + ": key 'rank_pattern': expected an object");
  if (!alpha_pattern->is_object()) throw FormatError(cp + ": key 'alpha_pattern': expected an object");
  const ojson null_v;
  const ojson& target_modules = get("target_modules") ? *get("target_modules") : null_v;
  const ojson& exclude_modules = get("exclude_modules") ? *get("exclude_modules") : null_v;

  // ---- adapter_model.safetensors: classify every tensor
  ad.tensors = SafeTensors::open(ad.weights_path);
  const std::string wp = ad.weights_path;
  struct Parts {
    std::string a, b, bias, mag;  // adapter keys
    bool embedding_a = false, embedding_b = false;
  };
  std::map<std::string, Parts> mods;  // by module path
  auto set_once = [&](std::string& slot, const std::string& key, const std::string& module) {
    if (!slot.empty())
      throw FormatError(wp + ": tensors " + q(slot) + " and " + q(key) + " are both the same LoRA weight of module " +
                        q(module));
    slot = key;
  };
  for (const std::string& key : ad.tensors.names()) {
    std::string k = key;
    if (k.rfind("base_model.model.", 0) == 0) k = k.substr(17);
    // Keys with the adapter name left in (".lora_A.default.weight", "modules_to_save.default."), as some PEFT
    // versions and tools write them.
    for (const char* seg : {".lora_A", ".lora_B"}) replace_all(k, std::string(seg) + ".default.", std::string(seg) + ".");
    for (const char* seg : {".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"})
      if (k.ends_with(std::string(seg) + ".default")) k.resize(k.size() - 8);
    if (k.ends_with(".lora_magnitude_vector.default.weight")) k.resize(k.size() - 15);
    if (k.ends_with(".lora_magnitude_vector.weight")) k.resize(k.size() - 7);
    replace_all(k, ".modules_to_save.default.", ".");

    std::string m = k;
    if (ends_with_strip(m, ".lora_A.weight")) set_once(mods[m].a, key, m);
    else if (ends_with_strip(m, ".lora_B.weight")) set_once(mods[m].b, key, m);
    else if (ends_with_strip(m, ".lora_B.bias")) set_once(mods[m].bias, key, m);
    else if (ends_with_strip(m, ".lora_embedding_A")) { set_once(mods[m].a, key, m); mods[m].embedding_a = true; }
    else if (ends_with_strip(m, ".lora_embedding_B")) { set_once(mods[m].b, key, m); mods[m].embedding_b = true; }
    else if (ends_with_strip(m, ".lora_magnitude_vector")) set_once(mods[m].mag, key, m);
    else if (k.find(".token_adapter.") != std::string::npos)
      throw UsageError(wp + ": tensor " + q(key) + ": trainable-token adapters are not supported by the merge");
    else {
      // Any other "lora_*" segment is a LoRA variant this merge does not know (AdaLoRA's lora_E, conv LoRA...).
      std::stringstream segs(k);
      for (std::string s; std::getline(segs, s, '.');)
        if (s.rfind("lora_", 0) == 0)
          throw UsageError(wp + ": tensor " + q(key) + ": unknown LoRA tensor (segment " + q(s) +
                           "); only lora_A/lora_B(.bias), lora_embedding_A/B and lora_magnitude_vector can be merged");
      // A whole base tensor saved with the adapter: modules_to_save, biases trained with bias="all"/"lora_only",
      // an embedding layer saved with its LoRA (`<module>.base_layer.weight`).
      replace_all(k, ".base_layer.", ".");
      if (ad.replaced.count(k))
        throw FormatError(wp + ": tensors " + q(ad.replaced[k]) + " and " + q(key) + " both replace base tensor " + q(k));
      ad.replaced[k] = key;
    }
  }

  // ---- LoRA on expert parameters (target_parameters): PEFT's ParamWrapper pairs come out of `mods`
  if (!target_parameters.empty()) {
    // The parameters target_parameters selects on module M (tuners_utils._inject_parameters: the key
    // "M.<param>" equals an entry or ends with "." + entry), in the order PEFT wraps them: the module's
    // parameter registration order, gate_up_proj before down_proj in every transformers experts class.
    auto registration = [](const std::string& p) { return p == "gate_up_proj" ? 0 : p == "down_proj" ? 1 : 2; };
    auto candidates = [&](const std::string& M) {
      std::vector<std::string> c;
      for (const std::string& t : target_parameters) {
        const std::string p = t.substr(t.rfind('.') == std::string::npos ? 0 : t.rfind('.') + 1);
        const std::string key = M + "." + p;
        if ((key == t || key.ends_with("." + t)) && std::find(c.begin(), c.end(), p) == c.end()) c.push_back(p);
      }
      std::stable_sort(c.begin(), c.end(), [&](const std::string& a, const std::string& b) { return registration(a) < registration(b); });
      return c;
    };
    std::map<std::string, std::map<int, std::string>> roots;  // M -> nesting depth -> key in mods
    for (const auto& [m, parts] : mods) {
      std::string root = m;
      int depth = 0;
      while (ends_with_strip(root, ".base_layer")) ++depth;
      roots[root][depth] = m;
    }
    for (const auto& [M, by_depth] : roots) {
      const std::vector<std::string> cand = candidates(M);
      const bool nested = by_depth.rbegin()->first > 0;
      bool is_param = nested;
      if (!is_param && !cand.empty()) {
        // A module target_modules selects is a Linear (PEFT refuses to wrap its parameters as well); otherwise a
        // pair target_parameters can explain is a ParamWrapper's: always with target_modules null, else when
        // target_modules does not select the module or its lora_A is not [r, in] at the module's rank (E > 1).
        const std::optional<bool> sel = selects(target_modules, M, cp + ": target_modules");
        if (target_modules.is_null()) is_param = true;
        else if (sel && !*sel) is_param = true;
        else if (!sel) {
          const Parts& p0 = mods.at(by_depth.at(0));
          const ojson* rp = pattern_value(*rank_pattern, M, cp + ": rank_pattern");
          const int64_t r_lin = rp ? rank_of(*rp, "rank_pattern entry for " + q(M)) : r_default;
          is_param = !p0.a.empty() && ad.tensors.info(p0.a).shape.size() == 2 && ad.tensors.info(p0.a).shape[0] != r_lin;
        }
      }
      if (!is_param) continue;
      const std::string where = wp + ": module " + q(M);
      const std::string first_key = mods.at(by_depth.begin()->second).a.empty() ? mods.at(by_depth.begin()->second).b
                                                                                 : mods.at(by_depth.begin()->second).a;
      if (cand.empty())
        throw FormatError(where + ": has nested LoRA tensors (" + q(first_key) + "), PEFT's layout for several "
                          "target_parameters on one module, but target_parameters in " + cp + " names none of its parameters");
      const int n = static_cast<int>(by_depth.size());
      if (by_depth.rbegin()->first != n - 1)
        throw FormatError(where + ": LoRA tensors at nesting depths that skip one (" + q(first_key) +
                          "): PEFT's nested ParamWrappers save <module>.lora_A, <module>.base_layer.lora_A, ... without gaps");
      if (static_cast<int>(cand.size()) != n) {
        std::string names;
        for (const auto& c : cand) names += (names.empty() ? "" : ", ") + c;
        throw FormatError(where + ": has " + std::to_string(n) + " nested LoRA pair(s) but target_parameters in " + cp +
                          " selects " + std::to_string(cand.size()) + " of its parameters (" + names +
                          "): cannot tell which pair adapts which parameter");
      }
      if (n > 1)
        for (const auto& c : cand)
          if (registration(c) == 2)
            throw UsageError(where + ": " + std::to_string(n) + " nested LoRA pairs on parameters including " + q(c) +
                             ": the nesting order (the module's parameter order) is only known for gate_up_proj / down_proj");
      std::map<std::string, LoraExpertParam*> made;
      for (const auto& [depth, mkey] : by_depth) {
        const Parts& parts = mods.at(mkey);
        const std::string pname = cand[static_cast<size_t>(n - 1 - depth)];  // the first wrapped is the innermost
        const std::string here = wp + ": " + q(M + "." + pname) + " (expert LoRA pair " + q(mkey) + ")";
        if (parts.a.empty() || parts.b.empty())
          throw FormatError(here + ": has " + q(parts.a.empty() ? (parts.b.empty() ? (parts.mag.empty() ? parts.bias : parts.mag) : parts.b) : parts.a) +
                            " but no " + (parts.a.empty() ? "lora_A" : "lora_B") + " tensor");
        if (parts.embedding_a || parts.embedding_b || !parts.mag.empty() || !parts.bias.empty())
          throw FormatError(here + ": PEFT's ParamWrapper has only lora_A.weight / lora_B.weight, not " +
                            q(!parts.mag.empty() ? parts.mag : !parts.bias.empty() ? parts.bias : parts.a));
        LoraExpertParam ep;
        ep.module = M;
        ep.param = pname;
        ep.target = M + "." + pname;
        ep.depth = depth;
        ep.key_a = parts.a;
        ep.key_b = parts.b;
        ep.A = ad.tensors.get(parts.a);
        ep.B = ad.tensors.get(parts.b);
        for (const auto& [name, t] : {std::pair<std::string, Tensor>{parts.a, ep.A}, {parts.b, ep.B}})
          if (t.ndim() != 2)
            throw FormatError(wp + ": tensor " + q(name) + " has shape " + shape_str(t.shape()) +
                              ": a ParamWrapper's lora_A / lora_B are 2-D ([r·E, in], [out, r·E])");
        const ojson* rp = pattern_value(*rank_pattern, ep.target, cp + ": rank_pattern");
        const ojson* ap = pattern_value(*alpha_pattern, ep.target, cp + ": alpha_pattern");
        ep.r = rp ? rank_of(*rp, "rank_pattern entry for " + q(ep.target)) : r_default;
        ep.alpha = ap ? num(*ap, "alpha_pattern entry for " + q(ep.target)) : alpha_default;
        const int64_t rows = ep.A.dim(0);
        if (rows % ep.r != 0 || rows == 0)
          throw FormatError(here + ": adapter_config.json gives rank " + std::to_string(ep.r) + (rp ? " (rank_pattern)" : " (r)") +
                            " but " + q(parts.a) + " has shape " + shape_str(ep.A.shape()) + ": want [r·E, in], r·E a multiple of " +
                            std::to_string(ep.r));
        ep.num_experts = rows / ep.r;
        if (ep.B.dim(1) != rows)
          throw FormatError(here + ": " + q(parts.a) + " " + shape_str(ep.A.shape()) + " and " + q(parts.b) + " " +
                            shape_str(ep.B.shape()) + " do not form a pair (A [r·E, in], B [out, r·E])");
        if (pname == "gate_up_proj" && ep.B.dim(0) % 2 != 0)
          throw FormatError(here + ": " + q(parts.b) + " " + shape_str(ep.B.shape()) + ": gate_up_proj's out (2·I: gate "
                            "rows, then up rows) must be even");
        check_lora_expert_param(ep, here);
        ep.scale = ad.use_rslora ? ep.alpha / std::sqrt(static_cast<double>(ep.r)) : ep.alpha / static_cast<double>(ep.r);
        const std::string target = ep.target;
        made[pname] = &ad.expert_params.emplace(target, std::move(ep)).first->second;
      }
      // gate_up_proj [E, 2I, H] and down_proj [E, H, I] of one experts module: check the nesting against the shapes.
      if (made.count("gate_up_proj") && made.count("down_proj")) {
        const LoraExpertParam& gu = *made["gate_up_proj"];
        const LoraExpertParam& dn = *made["down_proj"];
        auto fits = [](const LoraExpertParam& g, const LoraExpertParam& d) {
          return g.A.dim(1) == d.B.dim(0) && g.B.dim(0) == 2 * d.A.dim(1);
        };
        if (!fits(gu, dn) || gu.num_experts != dn.num_experts)
          throw FormatError(where + ": by PEFT's nesting, gate_up_proj (wrapped first: the inner " + q(gu.key_a) + " " +
                            shape_str(gu.A.shape()) + ", " + q(gu.key_b) + " " + shape_str(gu.B.shape()) + ", " +
                            std::to_string(gu.num_experts) + " experts) and down_proj (the outer " + q(dn.key_a) + " " +
                            shape_str(dn.A.shape()) + ", " + q(dn.key_b) + " " + shape_str(dn.B.shape()) + ", " +
                            std::to_string(dn.num_experts) + " experts) do not fit: want gate_up_proj's in = down_proj's "
                            "out (H), gate_up_proj's out = 2 x down_proj's in (2I) and the same number of experts" +
                            (fits(dn, gu) ? " (they fit the other way round: the nesting is swapped)" : ""));
      }
      for (const auto& [depth, mkey] : by_depth) mods.erase(mkey);
    }
  }

  // ---- one LoraModule per adapted module
  for (auto& [m, parts] : mods) {
    const std::string where = wp + ": module " + q(m);
    if (parts.a.empty() || parts.b.empty())
    {
      const std::string& have = !parts.a.empty() ? parts.a : !parts.b.empty() ? parts.b : !parts.mag.empty() ? parts.mag : parts.bias;
      throw FormatError(where + ": has " + q(have) + " but no " + (parts.a.empty() ? "lora_A" : "lora_B") + " tensor");
    }
    if (parts.embedding_a != parts.embedding_b)
      throw FormatError(where + ": mixes lora_embedding_* and lora_A/lora_B tensors (" + q(parts.a) + ", " + q(parts.b) + ")");
    if (!parts.mag.empty() && !ad.use_dora)
      throw FormatError(where + ": has " + q(parts.mag) + " but adapter_config.json does not set use_dora");
    if (parts.mag.empty() && ad.use_dora && !parts.embedding_a)
      throw FormatError(where + ": adapter_config.json sets use_dora but the module has no lora_magnitude_vector");
    if (parts.embedding_a && ad.use_dora)
      unsupported("use_dora", "DoRA on an embedding (" + m + ") is not supported by the merge");
    if (!parts.bias.empty() && !lora_bias)
      throw FormatError(where + ": has " + q(parts.bias) + " but adapter_config.json does not set lora_bias");

    LoraModule mod;
    mod.module = m;
    mod.target = m + ".weight";
    mod.key_a = parts.a;
    mod.key_b = parts.b;
    mod.w.kind = parts.embedding_a ? LoraKind::Embedding : LoraKind::Linear;
    mod.w.fan_in_fan_out = parts.embedding_a ? false : fan_in_fan_out;  // embeddings always transpose
    mod.w.A = ad.tensors.get(parts.a);
    mod.w.B = ad.tensors.get(parts.b);
    if (!parts.mag.empty()) mod.w.magnitude = ad.tensors.get(parts.mag);
    if (!parts.bias.empty()) {
      mod.w.bias = ad.tensors.get(parts.bias);
      mod.bias_target = m + ".bias";
      mod.key_bias = parts.bias;
    }
    for (const auto& [name, t] : {std::pair<std::string, Tensor>{parts.a, mod.w.A}, {parts.b, mod.w.B}})
      if (t.ndim() != 2)
        throw UsageError(wp + ": tensor " + q(name) + " has shape " + shape_str(t.shape()) +
                         ": only 2-D LoRA weights (Linear and Embedding layers) can be merged, not convolutions");
    check_lora_weights(mod.w, wp + ": module " + q(m) + " (" + q(parts.a) + " " + shape_str(mod.w.A.shape()) + ", " +
                                  q(parts.b) + " " + shape_str(mod.w.B.shape()) + ")");

    // rank and alpha: rank_pattern / alpha_pattern override r / lora_alpha (LoraModel._create_and_replace).
    const ojson* rp = pattern_value(*rank_pattern, m, cp + ": rank_pattern");
    const ojson* ap = pattern_value(*alpha_pattern, m, cp + ": alpha_pattern");
    mod.r = rp ? rank_of(*rp, "rank_pattern entry for " + q(m)) : r_default;
    mod.alpha = ap ? num(*ap, "alpha_pattern entry for " + q(m)) : alpha_default;
    if (mod.w.A.dim(0) != mod.r)
      throw FormatError(where + ": adapter_config.json gives rank " + std::to_string(mod.r) +
                        (rp ? " (rank_pattern)" : " (r)") + " but " + q(parts.a) + " has shape " +
                        shape_str(mod.w.A.shape()) + " (rank " + std::to_string(mod.w.A.dim(0)) + ")");
    // lora_alpha / r or lora_alpha / math.sqrt(r), in double as Python computes it.
    mod.w.scale = ad.use_rslora ? mod.alpha / std::sqrt(static_cast<double>(mod.r)) : mod.alpha / static_cast<double>(mod.r);

    if (auto sel = selects(target_modules, m, cp + ": target_modules"); sel && !*sel)
      ad.warnings.push_back("adapter module " + q(m) + " has LoRA tensors but target_modules in " + cp +
                            " does not select it (PEFT would not load them); merged anyway");
    if (auto ex = selects(exclude_modules, m, cp + ": exclude_modules"); ex && *ex)
      ad.warnings.push_back("adapter module " + q(m) + " has LoRA tensors but exclude_modules in " + cp +
                            " excludes it (PEFT would not load them); merged anyway");

    if (!mod.bias_target.empty()) ad.bias_owner[mod.bias_target] = mod.target;
    ad.modules.emplace(mod.target, std::move(mod));
  }
  if (ad.modules.empty() && ad.replaced.empty() && ad.expert_params.empty())
    throw FormatError(wp + ": no LoRA tensors (keys like base_model.model.<module>.lora_A.weight)");
  // A base tensor changed both through an expert parameter and otherwise (a per-expert Linear pair or a saved
  // tensor of the same expert weight): PEFT would not have built such an adapter.
  for (const auto& [t, m] : ad.modules)
    if (auto sl = ad.expert_slice(t))
      throw FormatError(wp + ": " + q(m.key_a) + " and " + q(sl->param->key_a) + " both adapt base tensor " + q(t) +
                        " (a per-expert Linear pair and a pair on the fused " + sl->param->target + ")");
  for (const auto& [t, k] : ad.replaced)
    if (auto sl = ad.expert_slice(t))
      throw FormatError(wp + ": " + q(k) + " replaces base tensor " + q(t) + ", which " + q(sl->param->key_a) + " adapts");
  return ad;
}

bool LoraAdapter::touches(const std::string& name) const {
  return modules.count(name) || bias_owner.count(name) || replaced.count(name) || expert_slice(name).has_value();
}

std::map<std::string, std::string> LoraAdapter::touched() const {
  return touched([](const std::string&) { return true; });
}

namespace {

// The per-expert hub names of expert parameter p (gate_up_proj: gate and up of every expert; down_proj: down) in
// the first naming the base has for expert 0; empty when it has none (or p is another parameter).
std::vector<std::string> per_expert_names(const LoraExpertParam& p, const std::function<bool(const std::string&)>& has) {
  const bool gu = p.param == "gate_up_proj";
  if (!gu && p.param != "down_proj") return {};
  std::string P = p.module;
  if (!ends_with_strip(P, ".experts")) return {};
  struct Naming {
    std::string block;
    const char *gate, *up, *down;
  };
  std::vector<Naming> namings = {{P, "gate_proj", "up_proj", "down_proj"}, {P, "w1", "w3", "w2"}};
  if (std::string Q = P; ends_with_strip(Q, ".mlp")) {  // Mixtral's hub names: block_sparse_moe
    namings.push_back({Q + ".block_sparse_moe", "w1", "w3", "w2"});
    namings.push_back({Q + ".block_sparse_moe", "gate_proj", "up_proj", "down_proj"});
  }
  for (const Naming& nm : namings) {
    const std::string pre = nm.block + ".experts.";
    if (!has(pre + "0." + (gu ? nm.gate : nm.down) + ".weight")) continue;
    std::vector<std::string> out;
    for (int64_t e = 0; e < p.num_experts; ++e) {
      const std::string pe = pre + std::to_string(e) + ".";
      if (gu) {
        out.push_back(pe + nm.gate + ".weight");
        out.push_back(pe + nm.up + ".weight");
      } else {
        out.push_back(pe + nm.down + ".weight");
      }
    }
    return out;
  }
  return {};
}

}  // namespace

std::map<std::string, std::string> LoraAdapter::touched(const std::function<bool(const std::string&)>& base_has) const {
  std::map<std::string, std::string> t;
  for (const auto& [n, k] : replaced) t[n] = k;
  for (const auto& [n, m] : modules) t[n] = m.key_a;
  for (const auto& [n, owner] : bias_owner) t[n] = modules.at(owner).key_bias;
  for (const auto& [n, p] : expert_params) {
    std::vector<std::string> names;
    if (!base_has(n)) names = per_expert_names(p, base_has);
    if (names.empty()) names.push_back(n);
    for (const auto& name : names) t[name] = p.key_a;
  }
  return t;
}

std::optional<LoraExpertSlice> LoraAdapter::expert_slice(const std::string& name) const {
  if (expert_params.empty()) return std::nullopt;
  auto whole = [](const LoraExpertParam& p) { return LoraExpertSlice{&p, -1, 0, p.B.dim(0)}; };
  if (auto it = expert_params.find(name); it != expert_params.end()) return whole(it->second);
  // "<prefix>.experts.<e>.<proj>.weight"
  std::string s = name;
  if (!ends_with_strip(s, ".weight")) return std::nullopt;
  size_t d = s.rfind('.');
  if (d == std::string::npos) return std::nullopt;
  const std::string proj = s.substr(d + 1);
  s.resize(d);
  d = s.rfind('.');
  if (d == std::string::npos) return std::nullopt;
  const std::string idx = s.substr(d + 1);
  s.resize(d);
  if (idx.empty() || idx.size() > 9 || idx.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  if (!s.ends_with(".experts")) return std::nullopt;
  static const struct {
    const char *proj, *param;
    int half;  // gate_up_proj: 0 = gate rows [0, I), 1 = up rows [I, 2I); -1: the whole delta
  } projs[] = {{"gate_proj", "gate_up_proj", 0}, {"w1", "gate_up_proj", 0}, {"up_proj", "gate_up_proj", 1},
               {"w3", "gate_up_proj", 1},        {"down_proj", "down_proj", -1}, {"w2", "down_proj", -1}};
  for (const auto& pr : projs) {
    if (proj != pr.proj) continue;
    std::vector<std::string> mods = {s};
    if (std::string t = s; ends_with_strip(t, ".block_sparse_moe.experts")) mods.push_back(t + ".mlp.experts");
    for (const auto& m : mods) {
      auto it = expert_params.find(m + "." + pr.param);
      if (it == expert_params.end()) continue;
      LoraExpertSlice sl = whole(it->second);
      sl.expert = std::stoll(idx);
      if (pr.half >= 0) {
        sl.rows = it->second.B.dim(0) / 2;
        sl.row0 = pr.half * sl.rows;
      }
      return sl;
    }
  }
  return std::nullopt;
}

void LoraAdapter::check_base_tensor(const std::string& name, const std::string& dtype, const Shape& shape,
                                    const std::string& base_file) const {
  const bool float_dtype = dtype == "F32" || dtype == "BF16" || dtype == "F16";
  auto where_base = [&] { return "base tensor " + q(name) + " " + shape_str(shape) + " " + dtype + " (" + base_file + ")"; };
  const std::optional<LoraExpertSlice> expert = expert_slice(name);
  if (!modules.count(name) && !expert) try {  // (an adapted weight gets the more specific message below)
    (void)dtype_from_safetensors(dtype);
  } catch (const Error&) {
    const auto t = touched();
    const auto it = t.find(name);
    throw FormatError(where_base() + " is changed by adapter tensor " + (it == t.end() ? std::string("?") : q(it->second)) + " (" + weights_path +
                      ") but its dtype is not one the merge can read or write (F32, BF16, F16, I32, I64)");
  }
  if (auto it = replaced.find(name); it != replaced.end()) {
    const TensorInfo& ti = tensors.info(it->second);
    if (ti.shape != shape)
      throw ShapeError("adapter tensor " + q(it->second) + " " + shape_str(ti.shape) + " (" + weights_path +
                       ") replaces " + where_base() + " but has another shape (a resized vocabulary is not supported: "
                       "the merged folder keeps the base's shapes)");
    if (!(float_dtype && is_float(ti.dtype)) && dtype != dtype_safetensors_name(ti.dtype))
      throw FormatError("adapter tensor " + q(it->second) + " " + dtype_safetensors_name(ti.dtype) + " (" + weights_path +
                        ") replaces " + where_base() + ": a float and a non-float tensor, or two different integer dtypes");
  }
  if (auto it = modules.find(name); it != modules.end()) {
    const LoraModule& m = it->second;
    if (!float_dtype)
      throw FormatError(where_base() + " is adapted by " + q(m.key_a) + " (" + weights_path +
                        ") but is not stored as F32/BF16/F16 (a quantized checkpoint?): merge into the original "
                        "float checkpoint");
    const Shape want = lora_base_shape(m.w);
    if (shape != want)
      throw ShapeError("adapter tensors " + q(m.key_a) + " " + shape_str(m.w.A.shape()) + " and " + q(m.key_b) + " " +
                       shape_str(m.w.B.shape()) + " (" + weights_path + ") need " +
                       (m.w.kind == LoraKind::Embedding ? "an embedding " : m.w.fan_in_fan_out ? "a fan_in_fan_out [in, out] " : "a [out, in] ") +
                       "weight " + shape_str(want) + ", but " + where_base() + " does not match");
  }
  if (expert) {
    const LoraExpertParam& p = *expert->param;
    const std::string pair = "adapter tensors " + q(p.key_a) + " " + shape_str(p.A.shape()) + " and " + q(p.key_b) + " " +
                             shape_str(p.B.shape()) + " (" + weights_path + ", LoRA on " + p.target + ": " +
                             std::to_string(p.num_experts) + " experts at rank " + std::to_string(p.r) + ")";
    if (!float_dtype)
      throw FormatError(where_base() + " is adapted by " + pair + " but is not stored as F32/BF16/F16 (a quantized "
                        "checkpoint?): merge into the original float checkpoint");
    const int64_t E = p.num_experts, out = p.B.dim(0), in = p.A.dim(1);
    if (expert->expert < 0) {
      if (!(shape == Shape{E, out, in} || (E == 1 && shape == Shape{out, in})))
        throw ShapeError(pair + " need the fused parameter " + shape_str({E, out, in}) + " ([experts, out, in], "
                         "transformers 5's layout), but " + where_base() + " does not match");
    } else if (expert->expert >= E) {
      throw ShapeError(where_base() + " is expert " + std::to_string(expert->expert) + ", but " + pair + " have " +
                       std::to_string(E) + " experts");
    } else if (shape != Shape{expert->rows, in}) {
      throw ShapeError(pair + " need " + shape_str({expert->rows, in}) + " for " +
                       (p.param == "gate_up_proj" ? (expert->row0 == 0 ? "the gate rows" : "the up rows") : std::string("the delta")) +
                       " of expert " + std::to_string(expert->expert) + ", but " + where_base() + " does not match");
    }
  }
  if (auto it = bias_owner.find(name); it != bias_owner.end()) {
    const LoraModule& m = modules.at(it->second);
    if (!float_dtype) throw FormatError(where_base() + " is changed by lora_B.bias but is not a float tensor");
    if (shape_numel(shape) != m.w.bias.numel() || shape.size() != 1)
      throw ShapeError("adapter tensor " + q(m.key_bias) + " " + shape_str(m.w.bias.shape()) + " (" +
                       weights_path + ") does not match " + where_base());
  }
}

Tensor LoraAdapter::merged(const std::string& name, const Tensor& base, std::optional<DType> out_dtype) const {
  const DType od = out_dtype.value_or(base.dtype());
  Tensor cur = base;
  if (auto it = replaced.find(name); it != replaced.end()) {
    cur = tensors.get(it->second);
    if (cur.dtype() != od) {
      if (!is_float(cur.dtype()) || !is_float(od))
        throw FormatError("adapter tensor " + q(it->second) + " (" + dtype_name(cur.dtype()) + ") cannot replace base tensor " +
                          q(name) + " (" + dtype_name(od) + ")");
      cur = cur.to(od);  // load_state_dict into the base-dtype module: one rounding
    }
  }
  if (auto it = modules.find(name); it != modules.end()) return merge_lora_weight(cur, it->second.w, od);
  if (auto sl = expert_slice(name)) return merge_lora_expert(cur, *sl->param, sl->expert, sl->row0, od);
  if (auto it = bias_owner.find(name); it != bias_owner.end()) return merge_lora_bias(cur, modules.at(it->second).w, od);
  return cur.dtype() != od ? cur.to(od) : cur.clone();  // never hand out a view of the base or of the adapter's mapping
}

void LoraAdapter::merge_inplace(const std::string& name, Tensor& base) const {
  if (modules.count(name) && !replaced.count(name)) {
    merge_lora_weight_inplace(base, modules.at(name).w);
    return;
  }
  if (!replaced.count(name))
    if (auto sl = expert_slice(name)) {
      merge_lora_expert_inplace(base, *sl->param, sl->expert, sl->row0);
      return;
    }
  Tensor m = merged(name, base, base.dtype());
  std::memcpy(base.raw(), m.raw(), base.nbytes());
}

}  // namespace am::io
