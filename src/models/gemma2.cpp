// Gemma 2 (Gemma2ForCausalLM, model_type gemma2): Gemma 3's layer (gemma3.cpp: zero-centred norms, sandwich
// norms, GeGLU, scaled embeddings, query_pre_attn_scalar) without the q/k norms and with one RoPE, the even
// layers sliding by default, and both soft-caps: attention scores and final logits -> cap * tanh(x / cap)
// (attn_logit_softcapping 50, final_logit_softcapping 30 by default; null turns one off). Soft-capping has
// CPU kernels only: on CUDA the model stops with a DeviceError before any weight moves.
#include "models/decoder.h"

namespace am {
void register_gemma2() {
  register_model("gemma2", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
