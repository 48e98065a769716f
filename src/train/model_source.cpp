#include "train/model_source.h"

#include <filesystem>
#include <map>

#include "config/recipe.h"
#include "core/error.h"
#include "core/log.h"

namespace am {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// A folder, or a hub id in the local HF cache (io::resolve_model_path); errors name the recipe key.
std::string resolve_dir(const Recipe& r, const std::string& key, const std::string& value) {
  try {
    return io::resolve_model_path(r.resolve_path(value));
  } catch (const IoError& e) {
    throw IoError(r.where(key) + ": " + e.what());
  }
}

// Keys of an AutoConfig mapping that are arguments of from_pretrained or kernel choices, not config fields.
bool is_config_call_argument(const std::string& k) {
  return k == "_target_" || k == "pretrained_model_name_or_path" || k == "trust_remote_code" || k == "name_or_path" ||
         k == "attn_implementation" || k == "_attn_implementation" || k == "attn_implementation_new";
}

// The model classes that mean "a causal LM" here.
void check_model_target(const Recipe& r) {
  const std::string t = r.get_string("model._target_", "");
  if (t.empty()) return;
  const bool causal = t.find("ForCausalLM") != std::string::npos;
  const bool known_call = t.find("from_pretrained") != std::string::npos || t.find("from_config") != std::string::npos;
  if (!causal || !known_call)
    r.fail("model._target_", "'" + t + "' is not supported: this engine builds causal LMs "
                             "(NeMoAutoModelForCausalLM.from_pretrained or .from_config)");
}

}  // namespace

ModelSource resolve_model_source(const Recipe& r) {
  check_model_target(r);
  ModelSource m;
  const std::string target = r.get_string("model._target_", "");
  const bool from_config = target.find("from_config") != std::string::npos;
  const bool has_pretrained = r.has("model.pretrained_model_name_or_path");
  const bool config_mapping = r.has("model.config") && r.node("model.config").is_object();

  // ---- the config.json and its overrides ----
  std::string config_source_key;  // the key naming the config's folder / file, for messages
  if (config_mapping) {
    const json& c = r.node("model.config");
    for (auto it = c.begin(); it != c.end(); ++it)
      if (!is_config_call_argument(it.key())) m.overrides[it.key()] = it.value();
    if (c.contains("pretrained_model_name_or_path")) {
      config_source_key = "model.config.pretrained_model_name_or_path";
      m.config_path = resolve_dir(r, config_source_key, r.get_string(config_source_key, ""));
    } else if (has_pretrained) {
      config_source_key = "model.pretrained_model_name_or_path";
      m.config_path = resolve_dir(r, config_source_key, r.get_string(config_source_key, ""));
    } else {
      r.fail("model.config", "an AutoConfig mapping needs pretrained_model_name_or_path (a model folder or hub id)");
    }
  } else if (r.has("model.config")) {
    config_source_key = "model.config";
    const std::string p = r.resolve_path(r.get_string("model.config", ""));
    if (fs::exists(p)) m.config_path = p;
    else m.config_path = resolve_dir(r, config_source_key, r.get_string("model.config", ""));  // a hub id
  } else if (has_pretrained) {
    config_source_key = "model.pretrained_model_name_or_path";
    m.config_path = resolve_dir(r, config_source_key, r.get_string(config_source_key, ""));
  } else {
    throw RecipeError(r.path() + ": the recipe needs model.pretrained_model_name_or_path or model.config "
                                 "(see docs/recipes.md)");
  }
  if (fs::is_directory(m.config_path)) m.config_path = (fs::path(m.config_path) / "config.json").string();
  if (!fs::exists(m.config_path))
    throw IoError(r.where(config_source_key) + ": no config.json at " + m.config_path);
  // from_pretrained's config kwargs written on `model:` (HF applies them to the config).
  std::map<std::string, std::string> override_key;  // config field -> the recipe key that set it
  for (auto it = m.overrides.begin(); it != m.overrides.end(); ++it) override_key[it.key()] = "model.config." + it.key();
  for (const char* k : {"router_aux_loss_coef", "vocab_size", "bos_token_id", "eos_token_id"})
    if (r.has(std::string("model.") + k)) {
      m.overrides[k] = r.node(std::string("model.") + k);
      override_key[k] = std::string("model.") + k;
    }

  // ---- weights ----
  if (has_pretrained && !from_config) {
    m.weights_dir = resolve_dir(r, "model.pretrained_model_name_or_path", r.get_string("model.pretrained_model_name_or_path", ""));
    if (!fs::exists(fs::path(m.weights_dir) / "config.json") && !config_mapping && !r.has("model.config"))
      throw IoError(r.where("model.pretrained_model_name_or_path") + ": no config.json in model folder '" + m.weights_dir + "'");
  } else if (has_pretrained && from_config && !r.has("model.config")) {
    // from_config with only a pretrained path: AutoModel builds from that folder's config, with random weights.
  }

  // ---- parse ----
  if (!m.overrides.empty()) {
    json base;
    try {
      base = io::load_model_config(m.config_path).raw;
    } catch (const Error&) {
      // A config that only parses with the overrides (e.g. an override fixes a field): report from the merged one.
    }
    for (auto it = m.overrides.begin(); it != m.overrides.end(); ++it)
      if (base.is_object() && !base.contains(it.key()))
        log::warn(r.where(override_key[it.key()]) + ": '" + it.key() +
                  "' is not a field of " + m.config_path + "; set anyway (as HF does)");
    m.cfg = io::load_model_config(m.config_path, m.overrides, r.path() + ": model.config");
  } else {
    m.cfg = io::load_model_config(m.config_path);
  }

  // ---- tokenizer ----
  std::string own;  // the model's own tokenizer folder, when it has one
  if (!m.weights_dir.empty()) own = m.weights_dir;
  else if (config_mapping || has_pretrained) own = fs::path(m.config_path).parent_path().string();
  m.tokenizer_dir = own;
  if (r.has("model.tokenizer")) {
    try {
      m.tokenizer_dir = resolve_dir(r, "model.tokenizer", r.get_string("model.tokenizer", ""));
    } catch (const IoError&) {
      // A recipe's tokenizer hub id that is not on this machine, while the model folder has its own tokenizer
      // (the recipe was pointed at a local copy of the model): use that, and say so.
      if (own.empty() || !fs::exists(fs::path(own) / "tokenizer.json")) throw;
      log::warn(r.where("model.tokenizer") + " (" + r.get_string("model.tokenizer", "") +
                ") is not on this machine; the model folder's tokenizer (" + own + ") is used");
    }
  }
  return m;
}

}  // namespace am
