// Constructors of the individual dataset kinds (make_dataset in registry.cpp picks one by `_target_`).
#pragma once
#include <map>

#include "data/dataset.h"

namespace am {
struct LengthLimit;
// limit: rows read (0 = all); rows longer than `length` are truncated or dropped as they are read.
std::unique_ptr<Dataset> make_tokenized_jsonl(const std::string& path, const DatasetContext& ctx, int64_t limit,
                                              const LengthLimit& length);
// seq_len tokens per sample, then the length limit (a shorter seq_length/max_length truncates or drops).
std::unique_ptr<Dataset> make_mock(int64_t seq_len, int64_t num_samples, int64_t vocab, uint64_t seed,
                                   const LengthLimit& length);
struct TextDatasetOptions;
std::unique_ptr<Dataset> make_chat(const TextDatasetOptions& o);
std::unique_ptr<Dataset> make_squad(const TextDatasetOptions& o);
std::unique_ptr<Dataset> make_hellaswag(const TextDatasetOptions& o);
std::unique_ptr<Dataset> make_column_mapped(const TextDatasetOptions& o, const std::map<std::string, std::string>& mapping,
                                            bool answer_only);
}  // namespace am
