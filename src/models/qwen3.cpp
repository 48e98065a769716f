// Qwen3 (Qwen3ForCausalLM): per-head RMSNorm on q and k (q_norm/k_norm over head_dim) before RoPE, an
// explicit head_dim (heads * head_dim may differ from hidden_size), no q/k/v bias by default.
#include "models/decoder.h"

namespace am {
void register_qwen3() {
  register_model("qwen3", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
