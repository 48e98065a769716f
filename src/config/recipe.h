// AutoModel-style YAML recipes (SPEC §2): load, apply `--a.b.c=VALUE` overrides, validate every key
// against the schema, and read typed values with errors that name the file, the key and its line.
#pragma once
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace am {

class Recipe {
 public:
  // Parses `path` (YAML) and applies overrides of the form "a.b.c=VALUE" (VALUE parsed as YAML).
  // Throws RecipeError (exit 2) for YAML syntax errors, unknown keys, bad override syntax, values that make no
  // sense (negative counts, nan/inf rates), a path that is not a regular file or is over 4 MiB, cyclic
  // aliases, alias bombs and numbers out of range (each naming the file and key).
  static Recipe load(const std::string& path, const std::vector<std::string>& overrides = {});
  static Recipe from_string(const std::string& yaml, const std::string& name = "<recipe>",
                            const std::vector<std::string>& overrides = {});

  const std::string& path() const { return path_; }
  // Directory of the recipe file, used to resolve relative paths that do not exist from the cwd.
  std::string dir() const;
  bool has(const std::string& key) const;      // present and not null
  bool present(const std::string& key) const;  // present, possibly null
  const nlohmann::json& node(const std::string& key) const;  // throws RecipeError if absent

  // Typed getters: the default is returned when the key is absent or null; a value of the wrong type
  // throws RecipeError("recipe.yaml:12: key 'optimizer.lr': expected a number, got \"abc\"").
  double get_double(const std::string& key, double def) const;
  int64_t get_int(const std::string& key, int64_t def) const;
  bool get_bool(const std::string& key, bool def) const;
  std::string get_string(const std::string& key, const std::string& def) const;
  std::optional<double> get_opt_double(const std::string& key) const;
  std::optional<int64_t> get_opt_int(const std::string& key) const;
  std::vector<double> get_double_list(const std::string& key, const std::vector<double>& def) const;
  // Resolves a path value: as given if absolute or it exists relative to the cwd, else relative to dir().
  std::string resolve_path(const std::string& value) const;

  // "recipe.yaml:12: key 'x.y'" (line when known) for messages.
  std::string where(const std::string& key) const;
  [[noreturn]] void fail(const std::string& key, const std::string& what) const;

  const nlohmann::json& root() const { return root_; }
  const std::vector<std::string>& warnings() const { return warnings_; }

  // The recipe class (`recipe:` as a bare name, a dotted path or {_target_: ...}), reduced to what runs here:
  // "finetune" (TrainFinetuneRecipeForNextTokenPrediction, or no `recipe:`) or "benchmark"
  // (BenchmarkingRecipeForNextTokenPrediction). Other classes are refused when the recipe is read.
  const std::string& recipe_class() const { return recipe_class_; }

 private:
  void validate();
  // AutoModel's spellings of things we read under one name (config/automodel_forms.cpp): tokenizer mappings -> folder strings, recipe mapping -> class, and the other aliases listed there.
  void normalize_automodel_forms();
  // Copies the value at `from` to `to` when `to` is absent (with its line); both given and different: RecipeError.
  void alias_key(const std::string& from, const std::string& to);
  void set_node(const std::string& key, nlohmann::json v);
  void check_values() const;  // numeric keys whose value cannot make sense (negative counts, nan/inf rates)
  std::string path_;
  nlohmann::json root_;
  std::map<std::string, int> lines_;  // dotted key -> 1-based line in the file (0: from an override)
  std::vector<std::string> warnings_;
  std::string recipe_class_ = "finetune";
};

}  // namespace am
