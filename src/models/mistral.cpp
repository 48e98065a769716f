// Mistral (MistralForCausalLM): Llama's layout plus a sliding attention window (`sliding_window`, every
// layer; null = full attention) and an explicit `head_dim`.
#include "models/decoder.h"

namespace am {
void register_mistral() {
  register_model("mistral", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
