// On-disk cache of tokenised text datasets (chat, squad, column_mapped, hellaswag): the samples a dataset
// kind builds from its rows, before the length limit and packing, stored under a key made of everything the
// tokens depend on, so that a second run (the validation set, `automodel dataset` then `finetune`, a resumed
// or repeated run) skips the tokenizer load and the tokenisation. See docs/datasets.md ("Tokenised dataset
// cache").
//
// The key (kept in full in the file's header and compared on every read) holds: a content hash of the
// tokenizer folder's files that the tokenizer and the chat template are read from (tokenizer.json,
// tokenizer_config.json, special_tokens_map.json, chat_template.jinja, chat_template.json,
// additional_chat_templates/*.jinja), of the `chat_template` override, of every data file of the source
// (with its split name and format), the split expression, `limit_dataset_samples`, the dataset kind and its
// formatting keys, the date when a template calls strftime_now, and the engine build (its ELF build-id): a
// rebuilt binary re-tokenises once rather than trusting samples an older tokenizer made.
//
// File (native little-endian): "AMTOKDS\0", u32 version, u32 key length, key bytes, u64 samples, u64 tokens,
// u32 length[samples], i32 input_ids[tokens], i32 labels[tokens], u64 lo + u64 hi content hash of everything
// before them. Written to a temporary file in the same folder and renamed over the final name (atomic: a
// reader sees the old file, the new one or none). A file that is truncated, corrupt, of another version or
// of another key is ignored with a one-line warning and rebuilt.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "data/dataset.h"

namespace am {

struct DataSource;

// 128-bit content hash (not cryptographic; stable across machines and runs).
struct Hash128 {
  uint64_t lo = 0, hi = 0;
  bool operator==(const Hash128&) const = default;
  std::string hex() const;  // 32 hex digits
};
Hash128 hash128(std::string_view bytes);
// The hash of a file's bytes, read in 1 MiB pieces; std::nullopt when it cannot be read.
std::optional<Hash128> hash_file(const std::string& path);

// The folder the cache lives in: $AM_CACHE_DIR/datasets, else $XDG_CACHE_HOME/automodel/datasets, else
// ~/.cache/automodel/datasets ("" when none of them is set).
std::string dataset_cache_dir();
// False when AM_DATASET_CACHE is 0 / false / off / no.
bool dataset_cache_enabled_by_env();

// What the key of one text dataset is made of.
struct TokenCacheKeyParts {
  std::string kind;                // "squad", "chat", "column_mapped", "hellaswag"
  std::string params;              // the kind's own formatting keys (column_mapping, answer_only_loss_mask...)
  std::string tokenizer_dir;
  std::string chat_template;       // the override as given (template text or a file path), "" = none
  bool uses_chat_template = true;  // false: the folder's template files are left out of the key (hellaswag)
  const DataSource* source = nullptr;  // the resolved source (never null when building a key)
  std::string split;
  int64_t limit = 0;
};
// The key text (several lines; deterministic). Throws IoError when a data file cannot be read.
std::string token_cache_key(const TokenCacheKeyParts& p);
// The cache file of a key inside `dir`.
std::string token_cache_path(const std::string& dir, const std::string& key);

// The samples stored at `path` for `key`; std::nullopt when there is no file (silently) or when it cannot be
// used (a one-line warning saying why: truncated, corrupt, another version, another key).
std::optional<std::vector<Sample>> read_token_cache(const std::string& path, const std::string& key);
// Writes the samples atomically (temporary file + rename); false (with a one-line warning) when it cannot.
// Samples with seq_lens (packed rows) are never cached (false, no warning).
bool write_token_cache(const std::string& path, const std::string& key, const std::vector<Sample>& samples);

}  // namespace am
