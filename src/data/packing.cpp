// Sequence packing (packed_sequence.packed_sequence_size > 0): samples are placed greedily, in order, into
// rows of at most `row_size` tokens. collate() gives every packed sample its own segment id (attention
// never crosses samples), restarts positions at 0 and never predicts a sample's first token from the
// previous one.
#include <algorithm>

#include "core/error.h"
#include "core/log.h"
#include "data/text_common.h"

namespace am {

namespace {
// Greedy packing, one sample at a time: a sample that does not fit the open row closes it.
class RowPacker {
 public:
  explicit RowPacker(int64_t row_size) : row_size_(row_size) {
    if (row_size < 1) throw DataError("pack: packed_sequence_size must be >= 1");
  }
  void add(const Sample& s) {
    const int64_t len = std::min<int64_t>(row_size_, static_cast<int64_t>(s.input_ids.size()));
    if (len == 0) return;
    if (static_cast<int64_t>(cur_.input_ids.size()) + len > row_size_) flush();
    cur_.input_ids.insert(cur_.input_ids.end(), s.input_ids.begin(), s.input_ids.begin() + len);
    cur_.labels.insert(cur_.labels.end(), s.labels.begin(), s.labels.begin() + len);
    cur_.seq_lens.push_back(static_cast<int32_t>(len));
  }
  std::vector<Sample> finish() {
    flush();
    return std::move(rows_);
  }

 private:
  void flush() {
    if (!cur_.input_ids.empty()) rows_.push_back(std::move(cur_));
    cur_ = Sample{};
  }
  int64_t row_size_;
  std::vector<Sample> rows_;
  Sample cur_;
};
}  // namespace

std::vector<Sample> pack(const std::vector<const Sample*>& samples, int64_t row_size) {
  RowPacker p(row_size);
  for (const Sample* s : samples) p.add(*s);
  return p.finish();
}

std::unique_ptr<Dataset> pack_dataset(const Dataset& ds, int64_t row_size) {
  // Samples are fetched one at a time: a lazy dataset (mock) is never held whole twice.
  RowPacker p(row_size);
  int64_t truncated = 0;
  for (size_t i = 0; i < ds.size(); ++i) {
    const Sample s = ds.get(i);
    truncated += static_cast<int64_t>(s.input_ids.size()) > row_size;
    p.add(s);
  }
  auto rows = p.finish();
  log::info("packed " + std::to_string(ds.size()) + " samples of " + ds.name() + " into " + std::to_string(rows.size()) +
            " rows of " + std::to_string(row_size) + " tokens" +
            (truncated ? " (" + std::to_string(truncated) + " samples truncated to the row size)" : ""));
  if (rows.empty()) throw DataError(ds.name() + ": nothing to pack");
  return std::make_unique<VectorDataset>("packed(" + ds.name() + ")", std::move(rows));
}

}  // namespace am
