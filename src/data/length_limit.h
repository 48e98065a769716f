// Sample length limits, shared by every dataset kind (tokenized_jsonl, squad, column_mapped, chat,
// hellaswag, mock): `seq_length` (alias `max_length`) caps a sample's length; a longer sample is truncated
// to it (input_ids and labels together) or, with `drop_long_samples: true`, dropped. AutoModel's tokenizer
// argument `truncation` (true / longest_first / only_first / only_second, or false / do_not_truncate) is
// honoured: with truncation off, a longer sample is kept whole (unless dropped).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace am {

class Recipe;

struct LengthLimit {
  int64_t max_len = 0;     // 0: no limit
  bool drop_long = false;  // drop_long_samples
  bool truncate = true;    // truncation (false: a longer sample is kept whole)
  std::string key;         // the recipe key that set max_len, for messages ("dataset.seq_length")
};

// What apply_length_limit did (counted over the samples it saw).
struct LengthLimitStats {
  int64_t seen = 0, truncated = 0, dropped = 0, kept_long = 0;
};

// Reads `sec.seq_length` (or `sec.max_length`), `sec.drop_long_samples` and `sec.truncation`. A limit that
// is zero or negative, or a truncation value that is neither a boolean nor a HF truncation strategy, is a
// RecipeError naming the key (exit 2).
LengthLimit read_length_limit(const Recipe& r, const std::string& sec);

// Reads a sample-count key (`limit_dataset_samples`, `num_samples_limit`, `num_samples`): absent/null ->
// std::nullopt; negative (or zero when !allow_zero) -> RecipeError naming the key.
std::optional<int64_t> read_sample_count(const Recipe& r, const std::string& key, bool allow_zero);

// One sample through the limit: truncated in place, or false when it is to be dropped.
bool limit_sample(Sample& s, const LengthLimit& lim, LengthLimitStats& st);

// Logs what was done, one line each: truncations (info), drops and long samples kept whole (warning).
// `kept`: samples left; none left because the limit dropped them all is a DataError naming the limit.
void report_length_limit(const LengthLimitStats& st, const LengthLimit& lim, const std::string& name, size_t kept);

// Every sample through limit_sample (dropped ones removed, order kept), then report_length_limit.
LengthLimitStats apply_length_limit(std::vector<Sample>& samples, const LengthLimit& lim, const std::string& name);

}  // namespace am
