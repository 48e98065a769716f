// NeMo AutoModel writes several things in more than one way. The engine reads one spelling; this pass rewrites
// the others into it once, right after the keys are checked, keeping each key's line for messages:
//   recipe: {_target_: X} / a.b.X        -> recipe_class() "finetune" | "benchmark" (others refused)
//   model.tokenizer / <dataset>.tokenizer as {_target_: AutoTokenizer.from_pretrained, pretrained_model_name_or_path: D}
//                                        -> the folder D
//   tokenizer: {pretrained_model_name_or_path: D} (top level)   -> model.tokenizer: D when that is absent
//   parallelizer.activation_checkpointing                      -> distributed.activation_checkpointing
//   checkpoint.max_recent_checkpoints                          -> checkpoint.keep_last_n
// `seed` and `rng.seed` are both kept: AutoModel seeds its StatefulRNG (model init) from the rng section and its
// data loaders from the top-level seed; the trainer does the same (Trainer::setup).
// model.config as an AutoConfig mapping stays a mapping: the trainer's model source reads it (train/model_source.h).
#include <string>

#include "config/recipe.h"
#include "core/error.h"

namespace am {
using json = nlohmann::json;

namespace {
std::string last_dotted(const std::string& s) {
  auto d = s.rfind('.');
  return d == std::string::npos ? s : s.substr(d + 1);
}
}  // namespace

void Recipe::set_node(const std::string& key, json v) {
  json* cur = &root_;
  size_t start = 0;
  while (true) {
    const size_t dot = key.find('.', start);
    const std::string part = key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (dot == std::string::npos) {
      (*cur)[part] = std::move(v);
      return;
    }
    if (!cur->contains(part) || !(*cur)[part].is_object()) (*cur)[part] = json::object();
    cur = &(*cur)[part];
    start = dot + 1;
  }
}

void Recipe::alias_key(const std::string& from, const std::string& to) {
  if (!has(from)) return;
  if (has(to)) {
    if (node(to) != node(from))
      throw RecipeError(where(to) + " and " + where(from) + " say the same thing differently (" + node(to).dump() +
                        " vs " + node(from).dump() + "); keep one");
    return;
  }
  set_node(to, node(from));
  auto it = lines_.find(from);
  if (it != lines_.end()) lines_[to] = it->second;
}

void Recipe::normalize_automodel_forms() {
  // ---- recipe class ----
  if (has("recipe")) {
    const json& rc = node("recipe");
    std::string cls;
    if (rc.is_string()) cls = rc.get<std::string>();
    else if (rc.is_object() && rc.contains("_target_") && rc["_target_"].is_string()) cls = rc["_target_"].get<std::string>();
    else fail("recipe", "expected a recipe class name or {_target_: ...}");
    const std::string name = last_dotted(cls);
    if (name == "TrainFinetuneRecipeForNextTokenPrediction" || name == "FinetuneRecipeForNextTokenPrediction")
      recipe_class_ = "finetune";
    else if (name == "BenchmarkingRecipeForNextTokenPrediction")
      recipe_class_ = "benchmark";
    else if (name.find("KnowledgeDistillation") != std::string::npos)
      fail("recipe", name + ": knowledge distillation is not supported (this engine runs "
                            "TrainFinetuneRecipeForNextTokenPrediction and BenchmarkingRecipeForNextTokenPrediction)");
    else if (name.find("VLM") != std::string::npos || name.find("Multimodal") != std::string::npos)
      fail("recipe", name + ": vision-language recipes are not supported (this engine trains causal text LMs)");
    else
      fail("recipe", "'" + cls + "' is not a recipe this engine runs (TrainFinetuneRecipeForNextTokenPrediction, "
                                 "BenchmarkingRecipeForNextTokenPrediction)");
  }

  // ---- tokenizer mappings -> folder strings ----
  auto flatten_tokenizer = [&](const std::string& key) {
    if (!has(key) || !node(key).is_object()) return;
    const json& m = node(key);
    if (!m.contains("pretrained_model_name_or_path") || !m["pretrained_model_name_or_path"].is_string())
      fail(key, "a tokenizer mapping needs pretrained_model_name_or_path (a tokenizer folder or hub id)");
    const int line = lines_.count(key + ".pretrained_model_name_or_path") ? lines_[key + ".pretrained_model_name_or_path"] : -1;
    set_node(key, m["pretrained_model_name_or_path"]);
    if (line >= 0) lines_[key] = line;
  };
  flatten_tokenizer("model.tokenizer");
  for (auto it = root_.begin(); it != root_.end(); ++it) {
    const std::string& k = it.key();
    if (k == "dataset" || k == "validation_dataset" || k.rfind("validation_dataset_", 0) == 0) flatten_tokenizer(k + ".tokenizer");
  }
  if (has("tokenizer.pretrained_model_name_or_path")) alias_key("tokenizer.pretrained_model_name_or_path", "model.tokenizer");

  // ---- other aliases ----
  alias_key("parallelizer.activation_checkpointing", "distributed.activation_checkpointing");
  alias_key("checkpoint.max_recent_checkpoints", "checkpoint.keep_last_n");
}

}  // namespace am
