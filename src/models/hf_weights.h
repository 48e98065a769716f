// Moving parameters between an HF model folder and a CausalLM: load (any float dtype -> fp32 master),
// random init from the config (HF's _init_weights: normal(0, initializer_range), norms 1, biases 0), and
// export as an HF folder with the source's tensor names, order, shapes and dtype.
#pragma once
#include <string>

#include "models/model.h"

namespace am {

// Loads every parameter from the safetensors in `model_dir`. Missing tensors and shape mismatches throw
// FormatError naming the tensor and both shapes. Tensors in the file the model does not use are reported
// by a warning (e.g. rotary buffers).
void load_hf_weights(CausalLM& model, const std::string& model_dir);

// Fail-fast pre-check, before the model is built (nothing is allocated: io::SafeTensors::open reads only
// the headers): every tensor the config implies for the embedding, lm_head, final norm and each decoder layer
// (attention, norms, MLP or MoE experts, as DecoderLM registers them) must be in the checkpoint with the
// shape config.json implies and a float dtype. Throws FormatError naming the tensor and both shapes (and the
// config keys behind the expected one), or the first missing tensor, exactly as load_hf_weights would
// after allocating the whole model.
void check_hf_weights_against_config(const std::string& model_dir, const io::ModelConfig& cfg);

// A checkpoint saved already 4-bit by bitsandbytes (transformers' BitsAndBytesConfig(load_in_4bit=True) then
// save_pretrained): config.json's quantization_config has quant_method "bitsandbytes" and load_in_4bit.
bool is_bnb_4bit_checkpoint(const io::ModelConfig& cfg);
// Loads such a checkpoint: each weight stored as bitsandbytes' 4-bit entries (W, W.absmax, W.quant_map, ...,
// W.quant_state.bitsandbytes__nf4; io/nf4.h) into Param::nf4, frozen (QLoRA: only LoRA adapters can train
// over it); every other tensor into fp32 values as load_hf_weights does. FormatError names the tensor on any
// mismatch (missing parts, shapes against config.json).
void load_bnb_4bit_weights(CausalLM& model, const std::string& model_dir);

// FP8 block-quantised checkpoints (hf_weights_fp8.cpp; DeepSeek-V3's hub files): quantization_config
// quant_method "fp8". load_hf_weights / check_hf_weights_against_config route them here: e4m3 weights with
// `<name>_scale_inv` block scales are dequantised into the fp32 master, and export writes them unquantised
// in the config's torch_dtype (quantization_config dropped from config.json).
bool is_fp8_checkpoint(const io::ModelConfig& cfg);
void load_fp8_weights(CausalLM& model, const std::string& model_dir);
void check_fp8_weights(const CausalLM& shapes_only_model, const std::string& model_dir);

// Random init (seeded, deterministic); `dtype` is the dtype recorded for export.
void init_random_weights(CausalLM& model, uint64_t seed, DType dtype);

// Writes config.json, model.safetensors (sharded above max_shard_bytes) and copies tokenizer and
// generation-config files from `source_dir` (if non-empty). Atomic per file.
void save_hf_model(const CausalLM& model, const std::string& out_dir, const std::string& source_dir,
                   size_t max_shard_bytes = size_t(5) << 30);

// The pieces of save_hf_model, for writers that hold only part of the model (dist/: each rank writes the
// tensors it owns). hf_tensors: p's tensors in the source's names, layout and dtype (host; p.value must be
// present). write_hf_side_files: config.json and the tokenizer / generation-config files.
void append_hf_tensors(const Param& p, std::vector<std::pair<std::string, Tensor>>& out);
void write_hf_side_files(const CausalLM& model, const std::string& out_dir, const std::string& source_dir);

}  // namespace am
