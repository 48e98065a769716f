#include "train/recipe.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <functional>
#include <sstream>

#include "core/error.h"
#include "core/log.h"

namespace am {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Keys this engine understands. '*' matches one path segment, a trailing '**' any subtree.
const char* kKnownKeys[] = {
    "seed", "device",
    "model._target_", "model.pretrained_model_name_or_path", "model.config", "model.tokenizer",
    "model.dtype", "model.torch_dtype", "model.backend.attn", "model.backend.experts",
    "model.backend.fake_balanced_gate", "model.backend.residual_dtype", "model.backend._target_",
    "model.backend.**",
    "step_scheduler.global_batch_size", "step_scheduler.local_batch_size", "step_scheduler.num_epochs",
    "step_scheduler.max_steps", "step_scheduler.ckpt_every_steps", "step_scheduler.val_every_steps",
    "step_scheduler.warmup_steps", "step_scheduler.timed_steps",
    "dataset._target_", "dataset.path_or_dataset", "dataset.split", "dataset.limit_dataset_samples",
    "dataset.column_mapping.**", "dataset.answer_only_loss_mask", "dataset.seq_len", "dataset.seq_length",
    "dataset.num_samples", "dataset.vocab_size", "dataset.max_length", "dataset.truncation",
    "dataset.drop_long_samples", "dataset.start_of_turn_token", "dataset.chat_template", "dataset.tokenizer",
    "dataset.num_samples_limit",
    "validation_dataset._target_", "validation_dataset.path_or_dataset", "validation_dataset.split",
    "validation_dataset.limit_dataset_samples", "validation_dataset.column_mapping.**",
    "validation_dataset.answer_only_loss_mask", "validation_dataset.seq_len", "validation_dataset.seq_length",
    "validation_dataset.num_samples", "validation_dataset.vocab_size", "validation_dataset.max_length",
    "validation_dataset.truncation", "validation_dataset.drop_long_samples", "validation_dataset.tokenizer",
    "validation_dataset.chat_template", "validation_dataset.start_of_turn_token", "validation_dataset.num_samples_limit",
    "dataloader.shuffle", "dataloader.drop_last", "dataloader._target_",
    "validation_dataloader.shuffle", "validation_dataloader.drop_last", "validation_dataloader._target_",
    "packed_sequence.packed_sequence_size", "packed_sequence.split_across_pack",
    "optimizer._target_", "optimizer.lr", "optimizer.betas", "optimizer.eps", "optimizer.weight_decay",
    "optimizer.momentum", "optimizer.dampening", "optimizer.nesterov", "optimizer.amsgrad",
    "optimizer.foreach", "optimizer.fused", "optimizer.maximize",
    "lr_scheduler.lr_decay_style", "lr_scheduler.lr_warmup_steps", "lr_scheduler.min_lr",
    "lr_scheduler.init_lr", "lr_scheduler.max_lr", "lr_scheduler.lr_decay_steps", "lr_scheduler.start_wd",
    "lr_scheduler.end_wd", "lr_scheduler.wd_incr_steps", "lr_scheduler.wd_incr_style",
    "clip_grad_norm.max_norm", "clip_grad_norm.norm_type",
    "loss_fn._target_", "loss_fn.ignore_index", "loss_fn.reduction",
    "peft._target_", "peft.target_modules", "peft.exclude_modules", "peft.match_all_linear", "peft.dim",
    "peft.alpha", "peft.dropout", "peft.dropout_position", "peft.lora_A_init", "peft.use_triton",
    "checkpoint.enabled", "checkpoint.checkpoint_dir", "checkpoint.save_consolidated",
    "checkpoint.restore_from", "checkpoint.model_save_format", "checkpoint.max_shard_size",
    "checkpoint.keep_last_n",
    "distributed._target_", "distributed.strategy", "distributed.dp_size", "distributed.tp_size",
    "distributed.cp_size", "distributed.pp_size", "distributed.ep_size", "distributed.dp_replicate_size",
    "distributed.activation_checkpointing", "distributed.sequence_parallel",
};

// NeMo AutoModel keys that have no meaning here: accepted with a one-line warning.
const char* kIgnoredKeys[] = {
    "wandb.**", "mlflow.**", "dist_env.**", "rng.**", "benchmark.**", "compile.**", "tensorboard.**",
    "model.trust_remote_code", "model.attn_implementation", "model.use_liger_kernel", "model.use_cache",
    "model.is_meta_device", "model.load_in_4bit", "model.load_in_8bit", "model.sdpa_method",
    "dataloader.num_workers", "dataloader.collate_fn", "dataloader.collate_fn.**", "dataloader.pin_memory",
    "dataloader.persistent_workers", "validation_dataloader.num_workers", "validation_dataloader.collate_fn",
    "validation_dataloader.collate_fn.**", "step_scheduler.log_every_steps",
    "dataset.pad_to_max_length", "validation_dataset.pad_to_max_length",
    "checkpoint.is_peft", "checkpoint.model_repo_id", "checkpoint.model_cache_dir", "checkpoint.save_async",
    "distributed.pin_memory", "distributed.defer_fsdp_grad_sync", "distributed.mp_policy.**",
    "distributed.offload_policy.**", "distributed.backend",
};

bool match_pattern(const std::string& pattern, const std::string& key) {
  // Split both on '.'.
  auto split = [](const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string part;
    while (std::getline(ss, part, '.')) out.push_back(part);
    return out;
  };
  auto p = split(pattern), k = split(key);
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == "**") return k.size() >= i;  // any subtree below (or the node itself)
    if (i >= k.size()) return false;
    if (p[i] != "*" && p[i] != k[i]) return false;
  }
  return p.size() == k.size();
}

template <size_t N>
bool matches_any(const char* const (&pats)[N], const std::string& key) {
  for (auto* p : pats)
    if (match_pattern(p, key)) return true;
  return false;
}

// True when `key` is the prefix of some known key (i.e. a section like "optimizer").
template <size_t N>
bool is_section(const char* const (&pats)[N], const std::string& key) {
  std::string pre = key + ".";
  for (auto* p : pats)
    if (std::string(p).rfind(pre, 0) == 0) return true;
  return false;
}

json scalar_to_json(const YAML::Node& n) {
  const std::string& s = n.Scalar();
  if (n.Tag() == "!") return s;  // quoted: always a string
  if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return nullptr;
  if (s == "true" || s == "True" || s == "TRUE") return true;
  if (s == "false" || s == "False" || s == "FALSE") return false;
  static const std::regex int_re(R"(^[-+]?[0-9]+$)");
  static const std::regex float_re(R"(^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$)");
  if (std::regex_match(s, int_re)) {
    try {
      return static_cast<int64_t>(std::stoll(s));
    } catch (...) {
      return std::stod(s);
    }
  }
  if (std::regex_match(s, float_re)) return std::stod(s);
  if (s == ".inf" || s == ".Inf" || s == "+.inf") return INFINITY;
  if (s == "-.inf" || s == "-.Inf") return -INFINITY;
  return s;
}

json yaml_to_json(const YAML::Node& n, const std::string& prefix, std::map<std::string, int>& lines,
                  const std::string& file) {
  if (!prefix.empty()) lines[prefix] = n.Mark().line + 1;
  switch (n.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined: return nullptr;
    case YAML::NodeType::Scalar: return scalar_to_json(n);
    case YAML::NodeType::Sequence: {
      json a = json::array();
      for (size_t i = 0; i < n.size(); ++i) a.push_back(yaml_to_json(n[i], prefix + "." + std::to_string(i), lines, file));
      return a;
    }
    case YAML::NodeType::Map: {
      json o = json::object();
      for (auto it = n.begin(); it != n.end(); ++it) {
        if (!it->first.IsScalar())
          throw RecipeError(file + ":" + std::to_string(it->first.Mark().line + 1) + ": mapping keys must be plain strings");
        std::string k = it->first.Scalar();
        std::string full = prefix.empty() ? k : prefix + "." + k;
        if (o.contains(k))
          throw RecipeError(file + ":" + std::to_string(it->first.Mark().line + 1) + ": duplicate key '" + full + "'");
        o[k] = yaml_to_json(it->second, full, lines, file);
      }
      return o;
    }
  }
  return nullptr;
}

YAML::Node parse_yaml(const std::string& text, const std::string& name) {
  try {
    return YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw RecipeError(name + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1) +
                      ": YAML syntax error: " + e.msg);
  }
}

std::string type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "a list";
  return "a mapping";
}

}  // namespace

Recipe Recipe::load(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream f(path);
  if (!fs::exists(path)) throw RecipeError("recipe file not found: " + path);
  if (!f) throw RecipeError("cannot read recipe file: " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return from_string(ss.str(), path, overrides);
}

Recipe Recipe::from_string(const std::string& yaml, const std::string& name, const std::vector<std::string>& overrides) {
  Recipe r;
  r.path_ = name;
  YAML::Node root = parse_yaml(yaml, name);
  if (!root.IsNull() && !root.IsMap()) throw RecipeError(name + ": the recipe must be a YAML mapping at the top level");
  r.root_ = root.IsNull() ? json::object() : yaml_to_json(root, "", r.lines_, name);
  for (const auto& ov : overrides) {
    auto eq = ov.find('=');
    if (eq == std::string::npos || eq == 0)
      throw UsageError("bad override '--" + ov + "': expected --section.key=VALUE");
    std::string key = ov.substr(0, eq), val = ov.substr(eq + 1);
    YAML::Node vn = parse_yaml(val.empty() ? "~" : val, "override --" + key);
    std::map<std::string, int> dummy;
    json v = yaml_to_json(vn, "", dummy, "override --" + key);
    json* cur = &r.root_;
    std::stringstream ks(key);
    std::string part, sofar;
    std::vector<std::string> parts;
    while (std::getline(ks, part, '.')) parts.push_back(part);
    for (size_t i = 0; i < parts.size(); ++i) {
      if (parts[i].empty()) throw UsageError("bad override key '--" + key + "'");
      sofar += (i ? "." : "") + parts[i];
      if (i + 1 == parts.size()) {
        (*cur)[parts[i]] = v;
      } else {
        if (!cur->contains(parts[i]) || (*cur)[parts[i]].is_null()) (*cur)[parts[i]] = json::object();
        if (!(*cur)[parts[i]].is_object())
          throw UsageError("override --" + key + ": '" + sofar + "' is not a section");
        cur = &(*cur)[parts[i]];
      }
    }
    r.lines_[key] = 0;
  }
  r.validate();
  return r;
}

void Recipe::validate() {
  // Walk every leaf (and every mapping that is not a known section) and check it against the schema.
  std::function<void(const json&, const std::string&)> walk = [&](const json& v, const std::string& key) {
    if (!key.empty()) {
      if (matches_any(kIgnoredKeys, key)) {
        // Warn once at the top of an ignored subtree.
        bool parent_ignored = false;
        auto dot = key.rfind('.');
        if (dot != std::string::npos && matches_any(kIgnoredKeys, key.substr(0, dot))) parent_ignored = true;
        if (!parent_ignored) warnings_.push_back(where(key) + " is a NeMo AutoModel key with no effect here; ignored");
        return;
      }
      bool known = matches_any(kKnownKeys, key);
      bool section = is_section(kKnownKeys, key) || is_section(kIgnoredKeys, key);
      if (known && !(v.is_object() && section)) return;  // a known leaf (its value may be anything)
      if (!section) {
        throw RecipeError(where(key) + ": unknown recipe key" +
                          (v.is_object() ? " (section)" : "") + "; see SPEC §2 for the schema");
      }
      if (!v.is_object() && !v.is_null())
        throw RecipeError(where(key) + ": expected a mapping (section), got " + type_name(v));
    }
    if (v.is_object())
      for (auto it = v.begin(); it != v.end(); ++it) walk(it.value(), key.empty() ? it.key() : key + "." + it.key());
  };
  walk(root_, "");
}

std::string Recipe::dir() const {
  fs::path p(path_);
  return p.has_parent_path() ? p.parent_path().string() : ".";
}

static const json* find_node(const json& root, const std::string& key) {
  const json* cur = &root;
  std::stringstream ks(key);
  std::string part;
  while (std::getline(ks, part, '.')) {
    if (!cur->is_object() || !cur->contains(part)) return nullptr;
    cur = &(*cur)[part];
  }
  return cur;
}

bool Recipe::present(const std::string& key) const { return find_node(root_, key) != nullptr; }
bool Recipe::has(const std::string& key) const {
  auto* n = find_node(root_, key);
  return n && !n->is_null();
}
const json& Recipe::node(const std::string& key) const {
  auto* n = find_node(root_, key);
  if (!n) throw RecipeError(path_ + ": missing required key '" + key + "'");
  return *n;
}

std::string Recipe::where(const std::string& key) const {
  auto it = lines_.find(key);
  if (it == lines_.end()) return path_ + ": key '" + key + "'";
  if (it->second == 0) return "command-line override --" + key;
  return path_ + ":" + std::to_string(it->second) + ": key '" + key + "'";
}

void Recipe::fail(const std::string& key, const std::string& what) const { throw RecipeError(where(key) + ": " + what); }

double Recipe::get_double(const std::string& key, double def) const {
  auto v = get_opt_double(key);
  return v ? *v : def;
}
std::optional<double> Recipe::get_opt_double(const std::string& key) const {
  auto* n = find_node(root_, key);
  if (!n || n->is_null()) return std::nullopt;
  if (!n->is_number() || n->is_boolean()) fail(key, "expected a number, got " + type_name(*n) + " " + n->dump());
  return n->get<double>();
}
int64_t Recipe::get_int(const std::string& key, int64_t def) const {
  auto v = get_opt_int(key);
  return v ? *v : def;
}
std::optional<int64_t> Recipe::get_opt_int(const std::string& key) const {
  auto* n = find_node(root_, key);
  if (!n || n->is_null()) return std::nullopt;
  if (n->is_number_float() && std::floor(n->get<double>()) == n->get<double>()) return static_cast<int64_t>(n->get<double>());
  if (!n->is_number_integer()) fail(key, "expected an integer, got " + type_name(*n) + " " + n->dump());
  return n->get<int64_t>();
}
bool Recipe::get_bool(const std::string& key, bool def) const {
  auto* n = find_node(root_, key);
  if (!n || n->is_null()) return def;
  if (!n->is_boolean()) fail(key, "expected true or false, got " + type_name(*n) + " " + n->dump());
  return n->get<bool>();
}
std::string Recipe::get_string(const std::string& key, const std::string& def) const {
  auto* n = find_node(root_, key);
  if (!n || n->is_null()) return def;
  if (n->is_string()) return n->get<std::string>();
  if (n->is_number() || n->is_boolean()) return n->dump();
  fail(key, "expected a string, got " + type_name(*n));
}
std::vector<double> Recipe::get_double_list(const std::string& key, const std::vector<double>& def) const {
  auto* n = find_node(root_, key);
  if (!n || n->is_null()) return def;
  if (!n->is_array()) fail(key, "expected a list of numbers, got " + type_name(*n));
  std::vector<double> out;
  for (auto& x : *n) {
    if (!x.is_number()) fail(key, "expected a list of numbers, found " + x.dump());
    out.push_back(x.get<double>());
  }
  return out;
}

std::string Recipe::resolve_path(const std::string& value) const {
  if (value.empty()) return value;
  fs::path p(value);
  if (p.is_absolute() || fs::exists(p)) return value;
  fs::path alt = fs::path(dir()) / p;
  if (fs::exists(alt)) return alt.string();
  return value;
}

}  // namespace am
