// HF model_type -> builder. Each architecture file exposes a register_* function called here (explicit
// calls rather than static initialisers, which a static library would drop at link time).
#include <map>
#include <mutex>

#include "core/error.h"
#include "models/model.h"

namespace am {

void register_llama();
void register_mistral();
void register_qwen2();
void register_qwen3();
void register_qwen3_moe();
void register_qwen2_moe();
void register_mixtral();
void register_olmoe();
void register_gemma2();
void register_gemma3();
void register_phi3();
void register_gpt_oss();
void register_deepseek();
void register_nemotron_h();

static std::map<std::string, ModelBuilder>& table() {
  static std::map<std::string, ModelBuilder> t;
  return t;
}

static void ensure_registered() {
  static std::once_flag once;
  std::call_once(once, [] {
    register_llama();
    register_mistral();
    register_qwen2();
    register_qwen3();
    register_qwen3_moe();
    register_qwen2_moe();
    register_mixtral();
    register_olmoe();
    register_gemma2();
    register_gemma3();
    register_phi3();
    register_gpt_oss();
    register_deepseek();
    register_nemotron_h();
  });
}

void register_model(const std::string& model_type, ModelBuilder b) { table()[model_type] = std::move(b); }

bool is_supported_model_type(const std::string& t) {
  ensure_registered();
  return table().count(t) != 0;
}

std::vector<std::string> supported_model_types() {
  ensure_registered();
  std::vector<std::string> out;
  for (auto& [k, v] : table()) out.push_back(k);
  return out;
}

std::unique_ptr<CausalLM> build_model(const io::ModelConfig& cfg, const ModelParallel& mp) {
  ensure_registered();
  auto it = table().find(cfg.model_type);
  if (it == table().end()) {
    std::string list;
    for (auto& [k, v] : table()) list += (list.empty() ? "" : ", ") + k;
    throw FormatError("config.json: model_type '" + cfg.model_type + "' is not supported (supported: " + list + ")");
  }
  if (mp.ep_size > 1) {
    if (!cfg.is_moe())
      throw UsageError("distributed.ep_size " + std::to_string(mp.ep_size) + ": model_type '" + cfg.model_type +
                       "' has no experts (expert parallelism is for MoE models)");
    if (cfg.num_experts % mp.ep_size != 0)
      throw UsageError("distributed.ep_size " + std::to_string(mp.ep_size) + " does not divide the " +
                       std::to_string(cfg.num_experts) + " experts of config.json");
  }
  return it->second(cfg, mp);
}

}  // namespace am

namespace am {

std::vector<const LoraAdapter*> CausalLM::enable_lora(const LoraSpec&, uint64_t, std::vector<std::string>*) {
  throw UsageError("peft: LoRA is not supported for model_type '" + config().model_type + "'");
}

}  // namespace am
