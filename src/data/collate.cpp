#include <algorithm>

#include "core/error.h"
#include "data/dataset.h"

namespace am {

int64_t count_label_tokens(const Sample& s) {
  int64_t n = 0;
  if (s.seq_lens.empty()) {
    for (size_t t = 1; t < s.labels.size(); ++t) n += s.labels[t] != -100;
    return n;
  }
  size_t start = 0;
  for (int32_t len : s.seq_lens) {
    for (size_t t = start + 1; t < start + static_cast<size_t>(len) && t < s.labels.size(); ++t) n += s.labels[t] != -100;
    start += static_cast<size_t>(len);
  }
  return n;
}

Batch upload_batch(const Batch& b, const ExecContext& ex) {
  if (!ex.on_cuda()) return b;
  Batch d = b;
  d.input_ids = ex.upload(b.input_ids);
  d.targets = ex.upload(b.targets);
  d.segment_ids = ex.upload(b.segment_ids);
  return d;
}

Batch collate(const std::vector<const Sample*>& samples, const CollateOptions& opt) {
  Batch b;
  b.B = static_cast<int64_t>(samples.size());
  for (auto* s : samples) b.T = std::max<int64_t>(b.T, static_cast<int64_t>(s->input_ids.size()));
  if (b.B == 0 || b.T == 0) throw DataError("collate: empty micro-batch");
  // Extra right padding changes only the shapes: padded positions are masked out of attention (segment -1)
  // and carry no targets, so every real token's result is the same (SPEC §3).
  b.T = std::max(b.T, opt.pad_to);
  if (opt.multiple_of > 1) b.T = (b.T + opt.multiple_of - 1) / opt.multiple_of * opt.multiple_of;
  const int64_t N = b.B * b.T;
  b.input_ids = Tensor::empty({N}, DType::I32);
  b.positions = Tensor::empty({N}, DType::I32);
  b.targets = Tensor::empty({N}, DType::I32);
  b.segment_ids = Tensor::empty({b.B, b.T}, DType::I32);
  int32_t *ids = b.input_ids.data<int32_t>(), *pos = b.positions.data<int32_t>(), *tg = b.targets.data<int32_t>(),
          *seg = b.segment_ids.data<int32_t>();
  b.one_segment_rows = true;
  for (int64_t r = 0; r < b.B; ++r) {
    const Sample& s = *samples[r];
    const int64_t L = static_cast<int64_t>(s.input_ids.size());
    // a packed row (more than one sample) needs the segment mask; right padding does not (model.h)
    if (s.seq_lens.size() > 1 || (s.seq_lens.size() == 1 && s.seq_lens[0] < L)) b.one_segment_rows = false;
    // Packed rows: segment k spans [start_k, start_k + seq_lens[k]); positions restart at each start.
    int64_t seg_id = 0, seg_start = 0;
    int64_t seg_end = s.seq_lens.empty() ? L : std::min<int64_t>(L, s.seq_lens[0]);
    for (int64_t t = 0; t < b.T; ++t) {
      const int64_t i = r * b.T + t;
      const bool real = t < L;
      while (real && t >= seg_end && seg_id + 1 < static_cast<int64_t>(s.seq_lens.size())) {
        ++seg_id;
        seg_start = seg_end;
        seg_end = std::min<int64_t>(L, seg_end + s.seq_lens[static_cast<size_t>(seg_id)]);
      }
      ids[i] = real ? s.input_ids[t] : 0;
      pos[i] = static_cast<int32_t>(real ? t - seg_start : t);
      seg[i] = real ? static_cast<int32_t>(seg_id) : -1;
      tg[i] = (t + 1 < L && t + 1 < seg_end) ? s.labels[t + 1] : -100;
      b.num_label_tokens += tg[i] != -100;
      b.num_real_tokens += real;
    }
  }
  return b;
}

}  // namespace am
