// Loading an HF model folder for inference (automodel generate): resolve the folder (or a hub id in the
// local HF cache, as training does), build the model from config.json, read the weights (headers checked
// first, as training does), merge a PEFT LoRA adapter when given, and move it to the device for
// inference only (DecoderLM::to_device_inference: no gradients, no fp32 master copy on the GPU).
//
// Precision: the CPU computes in fp32 whatever the checkpoint's dtype (the reference path). CUDA computes
// in bf16 (the backend's activation dtype) with the residual stream in bf16 for bf16/fp16 checkpoints (what
// HF does with a model loaded in bf16) and in fp32 for fp32 checkpoints (closer to HF's fp32 run).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "models/decoder.h"

namespace am {

struct InferenceLoadOptions {
  std::string model;    // HF folder or hub id
  std::string adapter;  // HF PEFT LoRA adapter folder ("" = none)
  std::string device = "auto";  // auto | cpu | cuda | cuda:N
};

struct InferenceModel {
  std::string dir;                  // the resolved model folder
  std::unique_ptr<CausalLM> model;  // owns the model
  DecoderLM* lm = nullptr;          // the same object when it is a DecoderLM (null: nemotron_h, which decodes from
                                    // its own hybrid cache on the CPU and recomputes on CUDA: has_incremental_decode)
  std::string device;               // "cpu" or "cuda:N"
  std::string device_name;          // e.g. "NVIDIA H200" ("cpu" on the host)
  DType checkpoint_dtype = DType::F32;  // dtype of the embedding in the checkpoint
};

// Throws UsageError (exit 2) for a bad device string, IoError (exit 1) naming the path for a missing
// model, FormatError for a bad config / checkpoint, DeviceError when cuda is asked for but unusable.
InferenceModel load_for_inference(const InferenceLoadOptions& o);

// What generate takes from DIR/generation_config.json (if present) and config.json.
struct GenerationDefaults {
  std::vector<int64_t> eos_token_ids;     // generation_config's eos_token_id (int or list), else config.json's
  std::string eos_source;                 // "generation_config.json", "config.json" or "" (none)
  std::optional<int64_t> max_new_tokens;  // generation_config's max_new_tokens, when set
};
GenerationDefaults read_generation_defaults(const std::string& dir, const io::ModelConfig& cfg);

}  // namespace am
