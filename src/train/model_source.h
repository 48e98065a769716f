// Where the model of a recipe comes from, read once from its `model:` section in every form AutoModel writes:
//   model: {_target_: NeMoAutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path: DIR_OR_HUB_ID}
//   model: {_target_: NeMoAutoModelForCausalLM.from_config,
//           config: {_target_: AutoConfig.from_pretrained, pretrained_model_name_or_path: ID, num_hidden_layers: 4, ...}}
//   model: {config: PATH/config.json (or its folder), tokenizer: DIR}          (ours: random init)
// plus from_pretrained's config kwargs written on `model:` itself (router_aux_loss_coef, vocab_size, ...).
#pragma once
#include <string>

#include <nlohmann/json.hpp>

#include "io/model_config.h"

namespace am {

class Recipe;

struct ModelSource {
  std::string weights_dir;     // the HF folder whose safetensors are loaded; "" = random init from `seed`
  std::string config_path;     // the config.json read
  nlohmann::json overrides = nlohmann::json::object();  // config fields the recipe sets
  std::string tokenizer_dir;   // model.tokenizer, else the weights' folder, else the config's folder
  io::ModelConfig cfg;         // config_path with the overrides applied
};

// Resolves and parses; errors name the recipe key (RecipeError, exit 2) or the file (IoError / FormatError).
// Hub ids are looked up in the local HF cache, never downloaded. Warnings (an override that is not a field of
// config.json) go to log::warn.
ModelSource resolve_model_source(const Recipe& r);

}  // namespace am
