// LoRA fine-tuning glue between the recipe, the model and the files (SPEC: LoRA (`peft:`)):
//   - the recipe's peft section (AutoModel's PeftConfig keys and defaults) -> LoraSpec;
//   - `peft.adapter_path`: an HF PEFT adapter folder whose A and B replace the fresh init (its config must
//     agree with the section: rank, alpha, rsLoRA and the set of modules, else exit 2);
//   - the adapter written as HF PEFT's save_pretrained writes it (adapter_config.json +
//     adapter_model.safetensors, keys base_model.model.<module>.lora_A.weight / lora_B.weight, fp32), which
//     `peft.PeftModel.from_pretrained(base, DIR)` loads as it is.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "models/lora.h"
#include "models/model.h"

namespace am {

class Recipe;

// Reads the recipe's peft section (exit 2 on a bad value, or on a feature not implemented: DoRA).
// `warnings` gets one line per accepted key that changes nothing here.
LoraSpec lora_spec_from_recipe(const Recipe& r, std::vector<std::string>* warnings);

// Copies A and B of every adapter of `model` from the PEFT adapter folder `dir` (host values; before
// to_device). `key` names the recipe key in errors.
void load_lora_adapter(CausalLM& model, const LoraSpec& spec, const std::string& dir, const std::string& key);

// One pair's tensors as PEFT's file holds them (host, fp32), from the model's values of A and B (host or
// device; grouped expert pairs are laid out as PEFT's ParamWrapper: A [r·E, in], B [out, r·E]).
std::pair<Tensor, Tensor> lora_file_tensors(const LoraAdapter& a, const Tensor& A, const Tensor& B);
// Every pair of `model`, under PEFT's names (one rank: data parallelism gathers first, train/checkpoint.cpp).
std::vector<std::pair<std::string, Tensor>> lora_tensors(const CausalLM& model);

// Writes DIR/adapter_config.json and DIR/adapter_model.safetensors (atomic per file): target_modules lists
// the adapted Linear modules by full name; expert pairs go to target_parameters with PEFT's rank_pattern /
// alpha_pattern where their rank differs (gate_up_proj at 2r).
void write_lora_adapter(const std::string& dir, const LoraSpec& spec, const std::vector<const LoraAdapter*>& adapters,
                        const std::vector<std::pair<std::string, Tensor>>& tensors,
                        const std::string& base_model_name_or_path);

// QLoRA (`quantization.load_in_4bit`): marks the frozen Linear weights bitsandbytes would quantise (every
// attention and MLP projection, shared experts included; not embeddings, lm_head, norms, routers or the fused
// MoE experts, which transformers 5 does not hold as nn.Linear) and sets the 4-bit options from the
// section's bnb_4bit_* keys. They are quantised when they reach their device (ParamStore::to_device; the
// CPU: ParamStore::quantize_marked). Returns how many weights were marked. Exit 2 without a peft section.
int64_t setup_4bit(const Recipe& r, CausalLM& model, std::vector<std::string>* warnings);

}  // namespace am
