// Llama (LlamaForCausalLM): the reference dense decoder. RoPE default/linear/llama3/yarn, optional
// `attention_bias` on q/k/v/o and `mlp_bias`, tied embeddings for the 1B/3B sizes.
#include "models/decoder.h"

namespace am {
void register_llama() {
  register_model("llama", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
