// Datasets yield tokenized samples; the collator turns a list of samples into a right-padded Batch.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/model.h"

namespace am {

class Recipe;

// One training example: labels aligned with input_ids as in HF (the model shifts); -100 = no loss.
struct Sample {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;
  // Packed rows only: lengths of the samples packed into this row, in order (sum = input_ids.size()).
  // Empty: one sample. Positions restart and targets never cross a boundary (see collate).
  std::vector<int32_t> seq_lens;
};

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual size_t size() const = 0;
  // Sample i, by value: a dataset may make it on demand rather than hold it (`mock` generates sample i from
  // the seed and i, so a million samples cost no memory). Callers that need stable pointers (collate, pack)
  // keep the returned samples alive while they use them.
  virtual Sample get(size_t i) const = 0;
  virtual std::string name() const = 0;
};

struct DatasetContext {
  int64_t vocab_size = 0;        // model vocab: every token id must be below it
  uint64_t seed = 42;
  std::string tokenizer_dir;     // for text datasets (tokenizer issue)
  int64_t default_seq_len = 0;   // mock default: model's max_position_embeddings capped
  int num_threads = 0;           // text datasets: formatting/tokenization threads (0 = every core)
};

// Builds the dataset described by recipe section `section` ("dataset" or "validation_dataset").
// Unknown `_target_` -> RecipeError; missing file -> IoError; bad line -> DataError naming file:line.
std::unique_ptr<Dataset> make_dataset(const Recipe& r, const std::string& section, const DatasetContext& ctx);

// Greedily packs samples (in order) into rows of at most `row_size` tokens; a sample longer than the row
// is truncated to it. Each row records its samples' lengths in Sample::seq_lens.
std::vector<Sample> pack(const std::vector<const Sample*>& samples, int64_t row_size);
// The packed form of a whole dataset (log::info reports rows and truncations).
std::unique_ptr<Dataset> pack_dataset(const Dataset& ds, int64_t row_size);

// How far rows are padded: to the longest row of the micro-batch, at least `pad_to` (a dataset's
// `padding: max_length` / `pad_to_max_length`), rounded up to a multiple of `multiple_of` (the collater's
// `pad_seq_len_divisible`).
struct CollateOptions {
  int64_t pad_to = 0;
  int64_t multiple_of = 1;
};

// Right-pads `samples` into one micro-batch (pad id 0, targets -100, segment -1 on padding) and shifts
// labels by one: targets[t] = labels[t+1].
Batch collate(const std::vector<const Sample*>& samples, const CollateOptions& opt = {});

// Copies the device-side tensors of a host batch (ids, targets, segments) to ex's device; positions stay
// on the host. CPU: returns the batch as is.
Batch upload_batch(const Batch& b, const ExecContext& ex);

// Number of label tokens a sample contributes after the shift.
int64_t count_label_tokens(const Sample& s);

}  // namespace am
