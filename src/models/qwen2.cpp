// Qwen2 (Qwen2ForCausalLM): biases on q/k/v (not o), sliding window only when `use_sliding_window` for
// layers >= `max_window_layers` (or as `layer_types` says).
#include "models/decoder.h"

namespace am {
void register_qwen2() {
  register_model("qwen2", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
