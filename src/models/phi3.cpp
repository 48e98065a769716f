// Phi-3 / Phi-4-mini (Phi3ForCausalLM, model_type phi3): Llama's block with the checkpoint's fused
// projections kept fused (io::ModelConfig::fused_qkv / fused_gate_up: self_attn.qkv_proj rows q | k | v,
// mlp.gate_up_proj rows gate | up; one GEMM each, and LoRA adapts the fused modules as PEFT does), one
// sliding window on every layer when `sliding_window` is set, partial rotary (`partial_rotary_factor`,
// Phi-4-mini) and LongRoPE (`rope_scaling.type` longrope / su: short factors up to
// original_max_position_embeddings, long ones past it, attention factor sqrt(1 + ln(factor) / ln(original))).
// resid/embd/attention dropout > 0 is warned about, not applied.
#include "models/decoder.h"

namespace am {
void register_phi3() {
  register_model("phi3", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); });
}
}  // namespace am
