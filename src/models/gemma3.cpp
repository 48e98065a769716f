// Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text): the decoder with every Gemma difference as a
// config flag (io::ModelConfig), read by DecoderLM:
//   - zero-centred RMSNorm, y = x_hat * (1 + w) in float32 (norm_plus_one), on all four norms of a layer, the
//     final norm and the per-head q/k norms;
//   - sandwich norms: post_attention_layernorm on the attention output and post_feedforward_layernorm on the
//     MLP output, each before its residual add; pre_feedforward_layernorm before the MLP;
//   - embeddings * sqrt(hidden_size) (rounded to the embedding dtype), tied lm_head by default;
//   - GeGLU MLP (gelu_pytorch_tanh), attention scale query_pre_attn_scalar^-0.5;
//   - sliding-window layers (5 local : 1 global by default) with their own RoPE (rope_parameters.
//     sliding_attention, v4: rope_local_base_freq), the global layers with rope_parameters.full_attention.
// Not supported (FormatError): attention / final logit soft-capping (Gemma 2), bidirectional attention.
#include "models/decoder.h"

namespace am {
void register_gemma3() {
  register_model("gemma3_text", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
