// Qwen3-MoE (Qwen3MoeForCausalLM): qwen3 attention (per-head q/k RMSNorm) with sparse MoE blocks;
// dense layers through mlp_only_layers / decoder_sparse_step; norm_topk_prob.
#include "models/decoder.h"

namespace am {
void register_qwen3_moe() {
  register_model("qwen3_moe", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
