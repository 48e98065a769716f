// GPT-OSS (GptOssForCausalLM): attention with q/k/v/o biases and a learned sink logit per head, alternating
// sliding-window / full layers (layer_types), YaRN RoPE; every layer a sparse MoE with a biased router
// (top-k of the logits, softmax over those k) and biased experts with the clamped, interleaved SwiGLU.
// All of it is DecoderLM with config flags (io/model_config.h: attn_sinks, router_bias, expert_bias,
// gpt_oss_glu). MXFP4 hub checkpoints are dequantised at load (models/mxfp4.h). CPU only for now.
#include "models/decoder.h"

namespace am {
void register_gpt_oss() {
  register_model("gpt_oss", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
