#include "models/inference.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/log.h"
#include "io/json_bounded.h"
#include "io/lora_adapter.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "models/hf_weights.h"
#include "ops/device.h"

namespace am {
namespace fs = std::filesystem;

namespace {

// "auto" -> cuda:0 when a GPU is visible, else cpu. Returns -1 for the CPU, else the GPU index.
int pick_device(const std::string& d, std::string* gpu_name) {
  int want = -2;  // -2 auto, -1 cpu, >= 0 that GPU
  if (d == "auto") want = -2;
  else if (d == "cpu") want = -1;
  else if (d == "cuda") want = 0;
  else if (d.rfind("cuda:", 0) == 0 && d.size() > 5 && d.find_first_not_of("0123456789", 5) == std::string::npos &&
           d.size() < 10)
    want = std::stoi(d.substr(5));
  else
    throw UsageError("--device: expected auto, cpu, cuda or cuda:N, got '" + d + "'");
  if (want == -1) return -1;
  std::string why;
  const auto devs = ops::list_gpus(&why);
  if (devs.empty()) {
    if (want == -2) return -1;
    throw DeviceError("--device " + d + ": no GPU is usable (" + why + ")");
  }
  const int idx = want < 0 ? 0 : want;
  if (idx >= static_cast<int>(devs.size()))
    throw DeviceError("--device " + d + ": only " + std::to_string(devs.size()) + " GPU(s) are visible");
  *gpu_name = devs[static_cast<size_t>(idx)].name;
  return idx;
}

// Merges a PEFT LoRA adapter into the loaded weights, in memory: every checkpoint tensor the adapter touches
// (a LoRA target, a lora_bias bias, a modules_to_save replacement) is re-read from the checkpoint in its
// stored dtype, merged by PEFT's merge_and_unload rule (io/lora_adapter.h: rounded once to that dtype, so
// the model equals `automodel merge-lora`'s output folder) and copied into the parameter slice it feeds
// (fused MoE experts: the per-expert slice). Tensors the adapter changes but the model does not read are an
// error, not a silent no-op.
void merge_adapter(CausalLM& model, const std::string& model_dir, const std::string& adapter_dir) {
  const io::LoraAdapter ad = io::LoraAdapter::load(adapter_dir);
  for (const auto& w : ad.warnings) log::warn("--adapter " + adapter_dir + ": " + w);
  const io::SafeTensors st = io::SafeTensors::open(model_dir);
  std::set<std::string> done;
  for (Param& p : model.params().all())
    for (const SourceSlice& s : p.source()) {
      if (!ad.touches(s.name)) continue;
      const io::TensorInfo& info = st.info(s.name);
      ad.check_base_tensor(s.name, dtype_safetensors_name(info.dtype), info.shape, info.file);
      const Tensor merged = ad.merged(s.name, st.get(s.name));  // [s.shape] in the checkpoint's dtype
      copy_slice_in(s, merged, p.value.f32());
      done.insert(s.name);
    }
  for (const auto& [name, by] : ad.touched([&](const std::string& n) { return st.has(n); }))  // experts: the base's layout
    if (!done.count(name))
      throw FormatError("--adapter " + adapter_dir + ": adapter tensor '" + by + "' changes '" + name +
                        "', which the model in " + model_dir + " does not read (model_type " + model.config().model_type + ")");
  log::info("generate: merged LoRA adapter " + adapter_dir + " into " + std::to_string(done.size()) + " tensor(s)");
}

}  // namespace

InferenceModel load_for_inference(const InferenceLoadOptions& o) {
  InferenceModel m;
  std::string gpu_name;
  const int gpu = pick_device(o.device, &gpu_name);  // a bad --device fails before anything is read
  m.dir = io::resolve_model_path(o.model);          // IoError naming what was tried
  const fs::path cfg_path = fs::path(m.dir) / "config.json";
  if (!fs::exists(cfg_path)) throw IoError("--model " + o.model + ": no config.json in model folder '" + m.dir + "'");
  const io::ModelConfig cfg = io::load_model_config(cfg_path.string());
  check_hf_weights_against_config(m.dir, cfg);  // headers only: fails before allocating
  m.model = build_model(cfg);
  m.lm = dynamic_cast<DecoderLM*>(m.model.get());  // null: nemotron_h (its own cache path, generate.h)
  load_hf_weights(*m.model, m.dir);
  if (!o.adapter.empty()) merge_adapter(*m.model, m.dir, o.adapter);
  auto& ps = m.model->params();
  m.checkpoint_dtype = ps.has("model.embed_tokens.weight") ? ps.get("model.embed_tokens.weight").source_dtype : DType::F32;
  // A model without the inference move (nemotron_h) is frozen first, so to_device keeps working copies only
  // (no gradients, no fp32 masters of 2-D weights).
  if (!m.lm)
    for (Param& p : ps.all()) ParamStore::freeze(p);
  if (gpu < 0) {
    if (m.lm) m.lm->to_device_inference(ExecContext::cpu());
    else m.model->to_device(ExecContext::cpu());
    m.device = "cpu";
    m.device_name = "cpu";
  } else {
    ops::use_gpu(gpu);
    const DType residual = m.checkpoint_dtype == DType::F32 ? DType::F32 : DType::BF16;
    if (m.lm) m.lm->to_device_inference(ExecContext::cuda_bf16(residual));
    else m.model->to_device(ExecContext::cuda_bf16(residual));
    m.device = "cuda:" + std::to_string(gpu);
    m.device_name = gpu_name;
  }
  return m;
}

GenerationDefaults read_generation_defaults(const std::string& dir, const io::ModelConfig& cfg) {
  GenerationDefaults g;
  const fs::path p = fs::path(dir) / "generation_config.json";
  if (fs::exists(p)) {
    std::ifstream f(p, std::ios::binary);
    if (!f) throw IoError("cannot read " + p.string());
    std::stringstream ss;
    ss << f.rdbuf();
    const nlohmann::json j = io::parse_json_bounded(ss.str(), p.string());
    if (!j.is_object()) throw FormatError(p.string() + ": expected a JSON object");
    if (j.contains("eos_token_id") && !j["eos_token_id"].is_null()) {
      const auto& e = j["eos_token_id"];
      auto one = [&](const nlohmann::json& v) {
        if (!v.is_number_integer()) throw FormatError(p.string() + ": eos_token_id: expected an integer or a list of integers");
        g.eos_token_ids.push_back(v.get<int64_t>());
      };
      if (e.is_array()) for (const auto& v : e) one(v);
      else one(e);
      g.eos_source = "generation_config.json";
    }
    if (j.contains("max_new_tokens") && !j["max_new_tokens"].is_null()) {
      if (!j["max_new_tokens"].is_number_integer() || j["max_new_tokens"].get<int64_t>() < 1)
        throw FormatError(p.string() + ": max_new_tokens: expected a positive integer");
      g.max_new_tokens = j["max_new_tokens"].get<int64_t>();
    }
  }
  if (g.eos_source.empty() && !cfg.eos_token_ids.empty()) {
    g.eos_token_ids = cfg.eos_token_ids;
    g.eos_source = "config.json";
  }
  return g;
}

}  // namespace am
