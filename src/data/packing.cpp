// Sequence packing (packed_sequence.packed_sequence_size > 0): samples are placed greedily, in order, into
// rows of at most `row_size` tokens. collate() gives every packed sample its own segment id (attention
// never crosses samples), restarts positions at 0 and never predicts a sample's first token from the
// previous one.
#include "core/error.h"
#include "core/log.h"
#include "data/text_common.h"

namespace am {

std::vector<Sample> pack(const std::vector<const Sample*>& samples, int64_t row_size) {
  if (row_size < 1) throw DataError("pack: packed_sequence_size must be >= 1");
  std::vector<Sample> rows;
  Sample cur;
  auto flush = [&] {
    if (!cur.input_ids.empty()) rows.push_back(std::move(cur));
    cur = Sample{};
  };
  for (const Sample* s : samples) {
    const int64_t len = std::min<int64_t>(row_size, static_cast<int64_t>(s->input_ids.size()));
    if (len == 0) continue;
    if (static_cast<int64_t>(cur.input_ids.size()) + len > row_size) flush();
    cur.input_ids.insert(cur.input_ids.end(), s->input_ids.begin(), s->input_ids.begin() + len);
    cur.labels.insert(cur.labels.end(), s->labels.begin(), s->labels.begin() + len);
    cur.seq_lens.push_back(static_cast<int32_t>(len));
  }
  flush();
  return rows;
}

std::unique_ptr<Dataset> pack_dataset(const Dataset& ds, int64_t row_size) {
  std::vector<const Sample*> all;
  int64_t truncated = 0;
  for (size_t i = 0; i < ds.size(); ++i) {
    all.push_back(&ds.get(i));
    truncated += static_cast<int64_t>(all.back()->input_ids.size()) > row_size;
  }
  auto rows = pack(all, row_size);
  log::info("packed " + std::to_string(all.size()) + " samples of " + ds.name() + " into " + std::to_string(rows.size()) +
            " rows of " + std::to_string(row_size) + " tokens" +
            (truncated ? " (" + std::to_string(truncated) + " samples truncated to the row size)" : ""));
  if (rows.empty()) throw DataError(ds.name() + ": nothing to pack");
  return std::make_unique<VectorDataset>("packed(" + ds.name() + ")", std::move(rows));
}

}  // namespace am
