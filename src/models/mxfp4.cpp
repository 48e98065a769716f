#include "models/mxfp4.h"

#include <cmath>
#include <vector>

#include "core/error.h"
#include "io/nf4.h"

namespace am {

bool is_mxfp4_checkpoint(const io::ModelConfig& cfg) {
  const auto& q = cfg.raw.contains("quantization_config") ? cfg.raw["quantization_config"] : nlohmann::json();
  return q.is_object() && q.value("quant_method", std::string()) == "mxfp4";
}

void mxfp4_dequantize(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float* out) {
  static const float kLut[16] = {+0.f, +.5f, +1.f, +1.5f, +2.f, +3.f, +4.f, +6.f,
                                 -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int e = static_cast<int>(scales[b]) - 127;
    for (int64_t j = 0; j < 16; ++j) {
      const uint8_t v = blocks[b * 16 + j];
      out[b * 32 + 2 * j] = std::ldexp(kLut[v & 0x0F], e);
      out[b * 32 + 2 * j + 1] = std::ldexp(kLut[v >> 4], e);
    }
  }
}

namespace {

Shape swap_last2(Shape s) {
  std::swap(s[s.size() - 1], s[s.size() - 2]);
  return s;
}

// One slice stored as an MXFP4 pair: checks it against the slice's hub shape and (unless check_only) writes
// the dequantised values into the parameter block.
void load_pair(const io::RawSafetensors& src, const SourceSlice& s, float* param, bool check_only) {
  const std::string bn = s.name + "_blocks", sn = s.name + "_scales";
  const io::RawTensor blocks = src.get(bn), scales = src.get(sn);
  if (blocks.dtype != "U8" || scales.dtype != "U8")
    throw FormatError(src.where() + ": MXFP4 tensors '" + bn + "' (" + blocks.dtype + ") and '" + sn + "' (" +
                      scales.dtype + ") must be U8");
  const Shape& bs = blocks.shape;
  if (bs.size() < 3 || bs.back() != 16)
    throw FormatError(src.where() + ": MXFP4 tensor '" + bn + "' has shape " + shape_str(bs) + ", expected [..., R, G, 16]");
  Shape want_scales(bs.begin(), bs.end() - 1);
  if (scales.shape != want_scales)
    throw FormatError(src.where() + ": MXFP4 tensor '" + sn + "' has shape " + shape_str(scales.shape) + ", expected " +
                      shape_str(want_scales) + " (one scale per block of '" + bn + "')");
  // Dequantised [..., R, G*32]; the hub tensor is its transpose over the last two dims.
  Shape deq(bs.begin(), bs.end() - 2);
  deq.push_back(bs[bs.size() - 2] * 32);
  if (s.shape.size() < 2 || swap_last2(deq) != s.shape)
    throw FormatError(src.where() + ": MXFP4 tensor '" + bn + "' dequantises to " + shape_str(swap_last2(deq)) +
                      " (after HF's transpose) but config.json implies " + shape_str(s.shape) + " for '" + s.name + "'");
  if (check_only) return;
  const int64_t n_blocks = shape_numel(want_scales);
  Tensor d = Tensor::empty(deq, DType::F32);
  mxfp4_dequantize(blocks.data, scales.data, n_blocks, d.f32());
  // The parameter block holds the hub tensor, or (transposed slice) its transpose, which is `d` itself.
  SourceSlice as_deq{s.name, s.offset, deq, !s.transposed};
  copy_slice_in(as_deq, d, param);
}

}  // namespace

void load_mxfp4_weights(CausalLM& model, const std::string& dir, bool check_only) {
  auto src = io::RawSafetensors::open(dir);
  for (auto& p : model.params().all()) {
    if (p.layouts.empty()) continue;
    p.layout = 0;  // the unquantised hub layout: what the export writes
    for (const SourceSlice& sl : p.source()) {
      float* dst = check_only ? nullptr : p.value.f32();
      if (!src->has(sl.name) && src->has(sl.name + "_blocks") && src->has(sl.name + "_scales")) {
        load_pair(*src, sl, dst, check_only);
        p.source_dtype = DType::BF16;  // HF dequantises MXFP4 to bf16
        continue;
      }
      if (!src->has(sl.name))
        throw FormatError(dir + ": tensor '" + sl.name + "' (or its MXFP4 '" + sl.name + "_blocks' / '_scales') is "
                          "missing from the checkpoint (model_type " + model.config().model_type + ")");
      const io::RawTensor t = src->get(sl.name);
      const DType dt = dtype_from_safetensors(t.dtype);
      if (dt != DType::F32 && dt != DType::BF16 && dt != DType::F16)
        throw FormatError(src->where() + ": tensor '" + sl.name + "' has dtype " + t.dtype + " (expected a float)");
      if (t.shape != sl.shape)
        throw FormatError(src->where() + ": tensor '" + sl.name + "' has shape " + shape_str(t.shape) +
                          " but config.json implies " + shape_str(sl.shape));
      if (!check_only) copy_slice_in(sl, Tensor::wrap(const_cast<uint8_t*>(t.data), t.shape, dt, nullptr), dst);
      p.source_dtype = dt;
    }
  }
}

}  // namespace am
