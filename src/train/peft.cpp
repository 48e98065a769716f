#include "train/peft.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "config/recipe.h"
#include "core/error.h"
#include "io/lora_adapter.h"
#include "io/safetensors.h"
#include "models/blocks/lora.h"
#include "models/exec.h"

namespace am {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::vector<std::string> string_list(const Recipe& r, const std::string& key) {
  if (!r.has(key)) return {};
  const json& v = r.node(key);
  if (v.is_string()) return {v.get<std::string>()};
  if (!v.is_array()) r.fail(key, "expected a module name pattern or a list of them");
  std::vector<std::string> out;
  for (const auto& e : v) {
    if (!e.is_string()) r.fail(key, "expected strings, got " + e.dump());
    out.push_back(e.get<std::string>());
  }
  return out;
}

std::string fmt(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

// One expert pair from PEFT's ParamWrapper layout (A [r·E, in], B [out, r·E]) into ours (A [E, r, in],
// B [E, out, r]).
void load_expert_pair(const io::LoraAdapter& ad, const LoraAdapter& a, const std::string& where) {
  const std::string name = a.module + "." + a.param;
  auto it = ad.expert_params.find(name);
  if (it == ad.expert_params.end())
    throw UsageError(where + ": has no LoRA weights for the experts' " + name + ", which peft.target_modules selects "
                     "(the adapter's targets and the section's must agree)");
  const io::LoraExpertParam& m = it->second;
  const int64_t E = a.A->shape[0], r = a.A->shape[1], in = a.A->shape[2], out = a.B->shape[1];
  if (m.r != r || std::abs(m.alpha - a.alpha) > 1e-9 * std::max(1.0, std::abs(a.alpha)))
    throw UsageError(where + ": " + name + " has rank " + std::to_string(m.r) + " / lora_alpha " + fmt(m.alpha) +
                     " but the section gives rank " + std::to_string(r) + " / alpha " + fmt(a.alpha) +
                     " (gate_up_proj: 2 x dim and 2 x alpha when gate and up are named separately, as HF PEFT)");
  if (m.A.shape() != Shape{r * E, in} || m.B.shape() != Shape{out, r * E})
    throw ShapeError(where + ": " + m.key_a + " / " + m.key_b + " have shapes " + shape_str(m.A.shape()) + " / " +
                     shape_str(m.B.shape()) + " but the model needs " + shape_str({r * E, in}) + " / " + shape_str({out, r * E}));
  const Tensor A = m.A.to(DType::F32), B = m.B.to(DType::F32);
  std::copy(A.f32(), A.f32() + A.numel(), a.A->value.f32());
  float* b = a.B->value.f32();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t k = 0; k < r; ++k) b[(e * out + o) * r + k] = B.f32()[o * r * E + k * E + e];
}

}  // namespace

LoraSpec lora_spec_from_recipe(const Recipe& r, std::vector<std::string>* warnings) {
  LoraSpec s;
  s.target_modules = string_list(r, "peft.target_modules");
  s.exclude_modules = string_list(r, "peft.exclude_modules");
  s.match_all_linear = r.get_bool("peft.match_all_linear", false);
  s.dim = r.get_int("peft.dim", 8);
  if (s.dim < 1) r.fail("peft.dim", "must be >= 1, got " + std::to_string(s.dim));
  s.alpha = r.get_double("peft.alpha", 32.0);
  if (!std::isfinite(s.alpha)) r.fail("peft.alpha", "must be a finite number");
  const double p = r.get_double("peft.dropout", 0.0);
  if (!(p >= 0.0 && p < 1.0)) r.fail("peft.dropout", "must be in [0, 1), got " + fmt(p));
  s.dropout = p;
  const std::string pos = r.get_string("peft.dropout_position", "post");
  if (pos != "pre" && pos != "post") r.fail("peft.dropout_position", "expected pre or post, got '" + pos + "'");
  s.dropout_post = pos == "post";
  s.lora_A_init = r.get_string("peft.lora_A_init", "xavier");
  if (s.lora_A_init == "xavier_normal") s.lora_A_init = "xavier";
  if (s.lora_A_init == "kaiming_uniform") s.lora_A_init = "kaiming";
  if (s.lora_A_init != "xavier" && s.lora_A_init != "kaiming")
    r.fail("peft.lora_A_init", "expected xavier or kaiming, got '" + s.lora_A_init + "'");
  s.use_rslora = r.get_bool("peft.use_rslora", false);
  if (r.get_bool("peft.use_dora", false))
    r.fail("peft.use_dora", "DoRA training is not implemented; set it to false for plain LoRA");
  if (r.has("peft.lora_dtype") && warnings)
    warnings->push_back(r.where("peft.lora_dtype") + ": the LoRA weights are trained in fp32 (master) with bf16 "
                        "working copies on GPUs, whatever lora_dtype says");
  if (r.get_bool("peft.moe_rank_scaling", false) && warnings)
    warnings->push_back(r.where("peft.moe_rank_scaling") + ": has no effect (MoE experts take no LoRA here)");
  return s;
}

void load_lora_adapter(CausalLM& model, const LoraSpec& spec, const std::string& dir, const std::string& key) {
  const std::string where = key + " " + dir;
  io::LoraAdapter ad;
  try {
    ad = io::LoraAdapter::load(dir);  // checks files, names and shapes
  } catch (const IoError& e) {
    throw IoError(key + ": " + e.what());
  } catch (const FormatError& e) {
    throw FormatError(key + ": " + e.what());
  }
  if (ad.use_dora) throw UsageError(where + ": a DoRA adapter; DoRA training is not implemented");
  if (!ad.replaced.empty())
    throw UsageError(where + ": the adapter also saves whole tensors (modules_to_save / biases), e.g. '" +
                     ad.replaced.begin()->first + "'; only plain LoRA adapters can be continued");
  if (ad.use_rslora != spec.use_rslora)
    throw UsageError(where + ": adapter_config.json has use_rslora " + (ad.use_rslora ? "true" : "false") +
                     " but peft.use_rslora is " + (spec.use_rslora ? "true" : "false"));
  std::set<std::string> ours;
  for (const LoraAdapter* a : model.lora_adapters()) {
    if (a->grouped) {
      ours.insert(a->module + "." + a->param);
      load_expert_pair(ad, *a, where);
      continue;
    }
    const std::string target = a->module + ".weight";
    ours.insert(target);
    auto it = ad.modules.find(target);
    if (it == ad.modules.end())
      throw UsageError(where + ": has no LoRA weights for " + a->module + ", which peft.target_modules selects "
                       "(the adapter's targets and the section's must agree)");
    const io::LoraModule& m = it->second;
    if (!m.bias_target.empty()) throw UsageError(where + ": " + m.key_bias + ": LoRA biases (lora_bias) are not supported");
    if (m.r != spec.dim)
      throw UsageError(where + ": " + a->module + " has rank " + std::to_string(m.r) + " but peft.dim is " +
                       std::to_string(spec.dim));
    if (std::abs(m.alpha - spec.alpha) > 1e-9 * std::max(1.0, std::abs(spec.alpha)))
      throw UsageError(where + ": " + a->module + " has lora_alpha " + fmt(m.alpha) + " but peft.alpha is " +
                       fmt(spec.alpha) + " (the scale alpha/r would change)");
    if (m.w.kind != io::LoraKind::Linear || m.w.fan_in_fan_out)
      throw UsageError(where + ": " + a->module + ": only Linear LoRA weights ([r, in], [out, r]) are supported");
    if (m.w.A.shape() != a->A->shape || m.w.B.shape() != a->B->shape)
      throw ShapeError(where + ": " + m.key_a + " / " + m.key_b + " have shapes " + shape_str(m.w.A.shape()) + " / " +
                       shape_str(m.w.B.shape()) + " but the model needs " + shape_str(a->A->shape) + " / " +
                       shape_str(a->B->shape));
    a->A->value.copy_from(m.w.A);
    a->B->value.copy_from(m.w.B);
  }
  for (const auto& [name, m] : ad.expert_params)
    if (!ours.count(name))
      throw UsageError(where + ": adapts the experts' " + name + ", which peft.target_modules does not select "
                       "(the adapter's targets and the section's must agree)");
  for (const auto& [target, m] : ad.modules)
    if (!ours.count(target))
      throw UsageError(where + ": adapts " + m.module + ", which peft.target_modules does not select "
                       "(the adapter's targets and the section's must agree)");
}

std::pair<Tensor, Tensor> lora_file_tensors(const LoraAdapter& a, const Tensor& A, const Tensor& B) {
  Tensor ha = ExecContext::download(A), hb = ExecContext::download(B);
  ha = ha.dtype() == DType::F32 ? ha.clone() : ha.to(DType::F32);
  hb = hb.dtype() == DType::F32 ? hb.clone() : hb.to(DType::F32);
  if (!a.grouped) return {ha, hb};
  // A [E, r, in] is PEFT's [r·E, in] (row e·r + k) as it is; B [E, out, r] -> [out, r·E] (column k·E + e).
  const int64_t E = hb.dim(0), out = hb.dim(1), r = hb.dim(2);
  Tensor pb = Tensor::empty({out, r * E}, DType::F32);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t k = 0; k < r; ++k) pb.f32()[o * r * E + k * E + e] = hb.f32()[(e * out + o) * r + k];
  return {ha.view({E * r, ha.dim(2)}), pb};
}

std::vector<std::pair<std::string, Tensor>> lora_tensors(const CausalLM& model) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const LoraAdapter* a : model.lora_adapters()) {
    auto [A, B] = lora_file_tensors(*a, a->A->value, a->B->value);
    out.emplace_back(a->A->name, A);
    out.emplace_back(a->B->name, B);
  }
  return out;
}

void write_lora_adapter(const std::string& dir, const LoraSpec& spec, const std::vector<const LoraAdapter*>& adapters,
                        const std::vector<std::pair<std::string, Tensor>>& tensors,
                        const std::string& base_model_name_or_path) {
  fs::create_directories(dir);
  std::set<std::string> modules, params;
  json rank_pattern = json::object(), alpha_pattern = json::object();
  auto num = [](double v) { return v == std::floor(v) && std::abs(v) < 1e15 ? json(static_cast<int64_t>(v)) : json(v); };
  for (const LoraAdapter* a : adapters) {
    if (!a->grouped) {
      modules.insert(a->module);
      continue;
    }
    params.insert(a->param);  // PEFT matches target_parameters by suffix, as it wrote them ("gate_up_proj")
    const std::string pat = ".*\\." + a->param;
    if (a->rank != spec.dim) rank_pattern[pat] = a->rank;
    if (a->alpha != spec.alpha) alpha_pattern[pat] = num(a->alpha);
  }
  std::vector<std::string> targets(modules.begin(), modules.end());
  // Every LoraConfig field whose PEFT default differs from this adapter is written (PEFT fills the rest
  // with its defaults); target_modules lists full module names, which PEFT's suffix rule matches exactly.
  json cfg = {{"alpha_pattern", alpha_pattern},
              {"base_model_name_or_path", base_model_name_or_path.empty() ? json(nullptr) : json(base_model_name_or_path)},
              {"bias", "none"},
              {"fan_in_fan_out", false},
              {"inference_mode", true},
              {"init_lora_weights", true},
              {"layers_pattern", nullptr},
              {"layers_to_transform", nullptr},
              {"lora_alpha", num(spec.alpha)},
              {"lora_bias", false},
              {"lora_dropout", spec.dropout},
              {"modules_to_save", nullptr},
              {"peft_type", "LORA"},
              {"r", spec.dim},
              {"rank_pattern", rank_pattern},
              {"target_modules", targets},
              {"target_parameters", params.empty() ? json(nullptr) : json(std::vector<std::string>(params.begin(), params.end()))},
              {"task_type", "CAUSAL_LM"},
              {"use_dora", false},
              {"use_rslora", spec.use_rslora}};
  const fs::path cfg_path = fs::path(dir) / "adapter_config.json";
  {
    fs::path tmp = cfg_path;
    tmp += ".tmp";
    std::ofstream f(tmp, std::ios::trunc);
    f << cfg.dump(2) << "\n";
    f.close();
    if (!f) throw IoError("cannot write " + tmp.string());
    fs::rename(tmp, cfg_path);
  }
  io::save_safetensors_file((fs::path(dir) / "adapter_model.safetensors").string(), tensors);
}

int64_t setup_4bit(const Recipe& r, CausalLM& model, std::vector<std::string>* warnings) {
  if (model.lora_adapters().empty())
    r.fail("quantization.load_in_4bit", "a 4-bit base can only be trained through LoRA adapters: add a peft section");
  auto& q = model.params().quant4;
  const std::string type = r.get_string("quantization.bnb_4bit_quant_type", "nf4");
  if (type != "nf4" && type != "fp4") r.fail("quantization.bnb_4bit_quant_type", "expected nf4 or fp4, got '" + type + "'");
  q.fp4 = type == "fp4";
  q.double_quant = r.get_bool("quantization.bnb_4bit_use_double_quant", true);
  const std::string cd = r.get_string("quantization.bnb_4bit_compute_dtype", "bfloat16");
  if (cd != "bfloat16" && cd != "bf16" && cd != "torch.bfloat16" && warnings)
    warnings->push_back(r.where("quantization.bnb_4bit_compute_dtype") + " (" + cd +
                        "): the 4-bit weights are dequantised to bf16 on GPUs (fp32 on the CPU)");
  const std::string st = r.get_string("quantization.bnb_4bit_quant_storage", "uint8");
  if (st != "uint8" && st != "torch.uint8" && warnings)
    warnings->push_back(r.where("quantization.bnb_4bit_quant_storage") + " (" + st +
                        "): 4-bit codes are held as bytes; the storage dtype only matters to FSDP in PyTorch");
  static const std::regex linear(R"(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_expert\.)?(gate|up|down)_proj)\.weight)");
  int64_t n = 0;
  for (Param& p : model.params().all())
    if (!p.trainable && p.shape.size() == 2 && std::regex_match(p.name, linear)) {
      p.quantize_4bit = true;
      ++n;
    }
  return n;
}

}  // namespace am
