// Gemma 2 (Gemma2ForCausalLM, model_type gemma2): Gemma 3's layer (gemma3.cpp: zero-centred norms, sandwich
// norms, GeGLU, scaled embeddings, query_pre_attn_scalar) without the q/k norms and with one RoPE, the even
// layers sliding by default, and both soft-caps: attention scores and final logits -> cap * tanh(x / cap)
// (attn_logit_softcapping 50, final_logit_softcapping 30 by default; null turns one off).
// CUDA: trains and generates there (bf16 activations). The soft-capped attention runs the tensor-core flash kernels
// (cap * tanh(s / cap) inside the tile softmax, its derivative in the backward; head dim 256); the soft-capped loss
// runs the chunked op path (models/decoder.cpp lm_head_cross_entropy: fp32 logits chunks, ops::softcap_ /
// softcap_bwd_ from backend/cuda/softcap.cu) instead of the fused LM-head kernel. GPU tests:
// tests/gpu/test_cuda_gemma2_deepseek.cpp, CudaAttention.* and GenerateCuda.* (tests/unit/test_generate.cpp).
#include "models/decoder.h"

namespace am {
void register_gemma2() {
  register_model("gemma2", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
