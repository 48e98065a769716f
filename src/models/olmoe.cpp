// OLMoE (OlmoeForCausalLM): llama attention with RMSNorm over the whole q and k projections, and a
// top-k MoE block in every layer.
#include "models/decoder.h"

namespace am {
void register_olmoe() {
  register_model("olmoe", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
