// DeepSeek-V3 (DeepseekV3ForCausalLM; also Moonlight / Kimi-K2 checkpoints) and DeepSeek-V2
// (DeepseekV2ForCausalLM, e.g. DeepSeek-V2-Lite): multi-head latent attention (models/blocks/mla.h), dense
// MLPs for the first first_k_dense_replace layers, then MoE blocks with DeepSeek's router and ungated shared
// experts (models/blocks/moe.h). Config keys: io/model_config_deepseek.cpp. CPU only for now.
#include "models/decoder.h"

namespace am {
void register_deepseek() {
  auto build = [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); };
  register_model("deepseek_v3", build);
  register_model("deepseek_v2", build);
}
}  // namespace am
