// Mixtral (MixtralForCausalLM): mistral attention with a top-k MoE block in every layer (top-k weights
// always renormalised); hub checkpoints name experts block_sparse_moe.experts.{e}.w1/w2/w3.
#include "models/decoder.h"

namespace am {
void register_mixtral() {
  register_model("mixtral", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
