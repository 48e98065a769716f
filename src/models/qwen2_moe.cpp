// Qwen2-MoE (Qwen2MoeForCausalLM): qwen2 attention (q/k/v biases) with sparse MoE blocks plus a
// sigmoid-gated shared expert; dense layers through mlp_only_layers / decoder_sparse_step.
#include "models/decoder.h"

namespace am {
void register_qwen2_moe() {
  register_model("qwen2_moe", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
