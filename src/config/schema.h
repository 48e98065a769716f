// The recipe key table: every key this engine reads, and every key NeMo AutoModel's LLM recipes use, with
// what happens to it here and why. One table (schema.cpp) is the single source for validation, warnings,
// typo suggestions and docs/recipes.md.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace am::config {

// What the engine does with a key.
enum class KeyUse {
  kHonoured,  // read and acted on, as AutoModel does (or as SPEC says for our own keys)
  kInert,     // AutoModel's meaning has no counterpart here and changes nothing about the run's numbers or
              // files (a Python data-loader knob, CI metadata, a kernel choice with the same math): accepted silently
  kWarn,      // accepted, with a one-line warning that says what runs instead (when `when` holds)
};

// When a kWarn rule (or the warning of a kHonoured rule with limits) fires, from the key's value.
enum class WarnWhen {
  kAlways,
  kTrue,      // the value is true (or, for a section, its `enabled`/`enable` is not false)
  kAbove1,    // an integer > 1
  kNotIn,     // the value (as a string) is not one of `allowed` ('|'-separated); null never warns
};

struct KeyRule {
  const char* pattern;  // dotted; '*' one segment, '**' (last) a whole subtree; '@ds' = dataset,
                        // validation_dataset or validation_dataset_<name>; '@dl' = dataloader or validation_dataloader
  KeyUse use;
  WarnWhen when;
  const char* allowed;  // kNotIn: the values that do not warn
  const char* reason;   // for kWarn: the end of "key 'x' (value): <reason>"; otherwise why the key is what it is
};

const std::vector<KeyRule>& key_table();

// The result of checking a recipe's keys against the table.
struct SchemaCheck {
  struct Unknown {
    std::string key;
    std::string suggestion;  // nearest known key ("" when none is close)
  };
  std::vector<Unknown> unknown;                          // keys neither ours nor AutoModel's
  std::vector<std::pair<std::string, std::string>> not_a_section;  // key, type name: a section given a scalar
  std::vector<std::pair<std::string, std::string>> warnings;       // key, " (value): reason" (to follow the key's location)
};

// Walks every key of `root` (a recipe as JSON) against the table.
SchemaCheck check_keys(const nlohmann::json& root);

// The nearest known key to `key` (edit distance on the dotted name, and on the last segment within the same
// section), or "" when nothing is close enough to be a plausible typo.
std::string nearest_key(const std::string& key);

// docs/recipes.md's key table, generated from key_table() (tools/gen_recipe_docs.sh checks it is current).
std::string key_table_markdown();

}  // namespace am::config
