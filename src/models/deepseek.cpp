// DeepSeek-V3 (DeepseekV3ForCausalLM; also Moonlight / Kimi-K2 checkpoints) and DeepSeek-V2
// (DeepseekV2ForCausalLM, e.g. DeepSeek-V2-Lite): multi-head latent attention (models/blocks/mla.h), dense
// MLPs for the first first_k_dense_replace layers, then MoE blocks with DeepSeek's router and ungated shared
// experts (models/blocks/moe.h). Config keys: io/model_config_deepseek.cpp.
// CUDA: trains and generates there (bf16 activations): MLA's column splits through ops::copy_cols_, its rope
// permutation and k_pe broadcast through ops/mla_ops.h (backend/cuda/mla_cols.cu), the grouped router through
// backend/cuda/moe_router_grouped.cu, the experts through the shared CUDA MoE path; FP8 checkpoints are
// dequantised on the host at load. MLA's attention (qk head dim != v head dim) runs the generic CUDA-core kernels,
// several times slower than the tensor-core flash kernels at the same shape. Verified on CUDA only by the GPU
// tests (tests/gpu/test_cuda_gemma2_deepseek.cpp, GenerateCuda.* in tests/unit/test_generate.cpp), not run yet.
#include "models/decoder.h"

namespace am {
void register_deepseek() {
  auto build = [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<DecoderLM>(c, mp); };
  register_model("deepseek_v3", build);
  register_model("deepseek_v2", build);
}
}  // namespace am
