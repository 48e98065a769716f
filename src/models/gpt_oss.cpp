// GPT-OSS (GptOssForCausalLM): attention with q/k/v/o biases and a learned sink logit per head, alternating
// sliding-window / full layers (layer_types), YaRN RoPE; every layer a sparse MoE with a biased router
// (top-k of the logits, softmax over those k) and biased experts with the clamped, interleaved SwiGLU.
// All of it is DecoderLM with config flags (io/model_config.h: attn_sinks, router_bias, expert_bias,
// gpt_oss_glu). MXFP4 hub checkpoints are dequantised at load (models/mxfp4.h).
// Devices: the CPU (fp32 reference) and CUDA (bf16 activations, fp32 master weights and grads): the sinks run in the
// tensor-core flash attention kernels (backend/cuda/attention.h: the sink joins the softmax normaliser, dsinks is a
// reduction kernel), the experts in the shared grouped GEMMs plus backend/cuda/gpt_oss_moe.cu (clamped SwiGLU,
// per-expert biases). GPU tests: tests/gpu/test_cuda_gpt_oss.cpp. Expert parallelism and LoRA on the experts /
// router are refused (UsageError) on every device. docs/gpt_oss.md.
#include "models/decoder.h"

namespace am {
void register_gpt_oss() {
  register_model("gpt_oss", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
