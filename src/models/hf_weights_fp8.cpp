// FP8 block-quantised checkpoints (the DeepSeek-V3 / V3.1 / R1 hub files: config.json quantization_config
// {quant_method: "fp8", fmt: "e4m3", weight_block_size: [128, 128]}). Each quantised Linear weight W [out, in]
// is stored as float8_e4m3fn with W.weight_scale_inv [ceil(out/bo), ceil(in/bi)] (float32 or bf16) beside
// it; everything else (embeddings, norms, routers, the correction bias) is a plain float tensor. Loading
// dequantises to the fp32 master: W[i, j] = fp8(W[i, j]) * scale_inv[i / bo, j / bi] (HF's
// finegrained_fp8 dequantisation). The engine trains and saves unquantised: such weights are exported in the
// config's torch_dtype (bf16 when unset) and save drops quantization_config from config.json.
#include <cctype>
#include <cmath>
#include <cstring>
#include <set>

#include "core/error.h"
#include "core/log.h"
#include "io/nf4.h"
#include "models/hf_weights.h"

namespace am {

namespace {

const nlohmann::json* fp8_config(const io::ModelConfig& cfg) {
  if (!cfg.raw.contains("quantization_config")) return nullptr;
  const auto& q = cfg.raw["quantization_config"];
  if (!q.is_object() || q.value("quant_method", std::string()) != "fp8") return nullptr;
  return &q;
}

// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN.
float e4m3_to_float(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 0xF, m = b & 7;
  float v;
  if (e == 0xF && m == 7) v = NAN;
  else if (e == 0) v = std::ldexp(static_cast<float>(m) / 8.f, -6);
  else v = std::ldexp(1.f + static_cast<float>(m) / 8.f, e - 7);
  return s ? -v : v;
}

void block_size(const io::ModelConfig& cfg, int64_t& bo, int64_t& bi) {
  bo = bi = 128;
  const auto& q = *fp8_config(cfg);
  if (q.contains("weight_block_size") && !q["weight_block_size"].is_null()) {
    const auto& b = q["weight_block_size"];
    if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
        b[0].get<int64_t>() <= 0 || b[1].get<int64_t>() <= 0)
      throw FormatError("config.json: quantization_config.weight_block_size must be two positive integers, got " +
                        b.dump());
    bo = b[0].get<int64_t>();
    bi = b[1].get<int64_t>();
  }
  const std::string fmt = q.value("fmt", std::string("e4m3"));
  if (fmt != "e4m3")
    throw FormatError("config.json: quantization_config.fmt '" + fmt + "' is not supported (only e4m3)");
  if (q.value("activation_scheme", std::string("dynamic")) != "dynamic" && q.contains("activation_scheme"))
    log::warn("config.json: quantization_config.activation_scheme is ignored: weights are dequantised at load");
}

// One slice of a parameter from the raw file into dst (fp32), dequantising FP8. Returns the dtype to record.
DType read_slice(const io::RawSafetensors& src, const SourceSlice& sl, float* dst, int64_t bo, int64_t bi,
                 DType model_dtype, std::set<std::string>& used) {
  if (!src.has(sl.name)) throw FormatError(src.where() + ": tensor '" + sl.name + "' is missing from the checkpoint");
  const io::RawTensor t = src.get(sl.name);
  used.insert(sl.name);
  if (t.shape != sl.shape)
    throw FormatError(src.where() + ": tensor '" + sl.name + "' has shape " + shape_str(t.shape) +
                      " but config.json implies " + shape_str(sl.shape));
  const int64_t n = shape_numel(t.shape);
  if (t.dtype != "F8_E4M3") {
    const DType dt = dtype_from_safetensors(t.dtype);
    if (dt != DType::F32 && dt != DType::BF16 && dt != DType::F16)
      throw FormatError(src.where() + ": tensor '" + sl.name + "' has dtype " + t.dtype + " (expected a float or F8_E4M3)");
    Tensor d = Tensor::wrap(dst, sl.shape, DType::F32, nullptr);
    d.copy_from(Tensor::wrap(const_cast<uint8_t*>(t.data), t.shape, dt, nullptr));
    return dt;
  }
  const std::string sname = sl.name + "_scale_inv";  // "x.weight" -> "x.weight_scale_inv"
  if (t.shape.size() != 2)
    throw FormatError(src.where() + ": FP8 tensor '" + sl.name + "' must be 2-D, got " + shape_str(t.shape));
  if (!src.has(sname))
    throw FormatError(src.where() + ": FP8 tensor '" + sl.name + "' has no block scales '" + sname + "'");
  const io::RawTensor s = src.get(sname);
  used.insert(sname);
  const int64_t R = t.shape[0], C = t.shape[1], sr = (R + bo - 1) / bo, sc = (C + bi - 1) / bi;
  if (s.shape != Shape{sr, sc})
    throw FormatError(src.where() + ": '" + sname + "' has shape " + shape_str(s.shape) + ", expected " +
                      shape_str(Shape{sr, sc}) + " (blocks of " + std::to_string(bo) + " x " + std::to_string(bi) + ")");
  const DType sdt = dtype_from_safetensors(s.dtype);
  Tensor scale = Tensor::wrap(const_cast<uint8_t*>(s.data), s.shape, sdt, nullptr).to(DType::F32);
  const uint8_t* q = t.data;
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) dst[i * C + j] = e4m3_to_float(q[i * C + j]) * scale.f32()[(i / bo) * sc + j / bi];
  (void)n;
  return model_dtype;
}

}  // namespace

bool is_fp8_checkpoint(const io::ModelConfig& cfg) { return fp8_config(cfg) != nullptr; }

void load_fp8_weights(CausalLM& model, const std::string& dir) {
  const io::ModelConfig& cfg = model.config();
  int64_t bo, bi;
  block_size(cfg, bo, bi);
  const DType model_dtype = cfg.torch_dtype.empty() ? DType::BF16 : dtype_from_name(cfg.torch_dtype);
  auto src = io::RawSafetensors::open(dir);
  std::set<std::string> used;
  for (auto& p : model.params().all()) {
    for (const SourceSlice& sl : p.source()) {  // the preferred (hub) layout: the FP8 files use it
      if (p.value.defined())
        p.source_dtype = read_slice(*src, sl, p.value.f32() + sl.offset, bo, bi, model_dtype, used);
    }
  }
  int64_t mtp = 0, other = 0;
  std::string example;
  for (const auto& n : src->names()) {
    if (used.count(n)) continue;
    if (cfg.deepseek && n.rfind("model.layers.", 0) == 0 && n.size() > 13 && std::isdigit(static_cast<unsigned char>(n[13])) &&
        std::stoll(n.substr(13)) >= cfg.num_hidden_layers) {
      ++mtp;
      continue;
    }
    if (example.empty()) example = n;
    ++other;
  }
  if (mtp > 0)
    log::warn(dir + ": skipping " + std::to_string(mtp) + " tensor(s) of the multi-token-prediction layer(s) (not trained; not written on export)");
  if (other > 0)
    log::warn(dir + ": " + std::to_string(other) + " tensor(s) in the checkpoint are not used, e.g. '" + example + "'");
  log::info(dir + ": FP8 (e4m3, " + std::to_string(bo) + "x" + std::to_string(bi) +
            " block scales) weights dequantised; they are saved unquantised in " + dtype_name(model_dtype));
}

void check_fp8_weights(const CausalLM& model, const std::string& dir) {
  auto src = io::RawSafetensors::open(dir);
  for (const auto& p : const_cast<CausalLM&>(model).params().all())
    for (const SourceSlice& sl : p.source()) {
      if (!src->has(sl.name))
        throw FormatError(dir + ": tensor '" + sl.name + "' is missing from the checkpoint (model_type " +
                          model.config().model_type + ")");
      const io::RawTensor t = src->get(sl.name);
      if (t.shape != sl.shape)
        throw FormatError(src->where() + ": tensor '" + sl.name + "' has shape " + shape_str(t.shape) +
                          " but config.json implies " + shape_str(sl.shape));
    }
}

}  // namespace am
