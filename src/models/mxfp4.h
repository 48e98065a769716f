// MXFP4 checkpoints (openai/gpt-oss-* on the Hub; config.json quantization_config.quant_method "mxfp4"): the
// experts' weights are stored as `<name>_blocks` (uint8 [..., G, 16]: 32 FP4 E2M1 values per block, two per
// byte, low nibble first) and `<name>_scales` (uint8 [..., G]: one E8M0 exponent per block, bias 127):
//   value = LUT[nibble] * 2^(scale - 127),  LUT = [0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6]
// The blocks dequantise to [E, R, C] (rows of the blocks' leading dims, C = G * 32) and HF's
// convert_moe_packed_tensors transposes that to the hub layout [E, C, R] (gate_up_proj [E, H, 2I],
// down_proj [E, I, H]). The engine dequantises once at load (exact in fp32 and in bf16) into its fp32
// master weights and forgets the quantisation: the parameters then export as bf16 tensors under the
// unquantised names, in HF's unquantised layout, and config.json loses quantization_config (what
// transformers' GptOssForCausalLM.from_pretrained(..., dequantize=True).save_pretrained writes).
#pragma once
#include <cstdint>
#include <string>

#include "models/model.h"

namespace am {

bool is_mxfp4_checkpoint(const io::ModelConfig& cfg);
// Loads every parameter: plain float tensors as load_hf_weights does, MXFP4 pairs dequantised. FormatError
// names the tensor on a missing tensor, a shape that disagrees with config.json or a bad dtype. check_only:
// the same checks on a shapes-only model (nothing is copied; check_hf_weights_against_config).
void load_mxfp4_weights(CausalLM& model, const std::string& model_dir, bool check_only = false);
// Dequantises n_rows blocks (16 bytes each) with one scale per block into out [n_rows * 32].
void mxfp4_dequantize(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float* out);

}  // namespace am
