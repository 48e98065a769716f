// `mock`: random token ids (seeded), labels = input_ids. For benchmarks and smoke tests. Samples go through
// the same length limit as every dataset (a seq_length/max_length below seq_len truncates or drops them).
//
// Nothing is stored: sample i is generated when asked for, from (seed, i) alone, so `num_samples: 1000000`
// costs no memory and any access order (shuffled epochs, several ranks, resume) sees the same numbers.
// Token t of sample i is a counter-based hash (SplitMix64's finalizer) of (seed, i, t) scaled to the vocab
// by a 128-bit multiply: no engine state to advance, and the same values with any standard library (the
// <random> distributions are implementation-defined).
#include "core/error.h"
#include "data/datasets_impl.h"
#include "data/length_limit.h"

namespace am {

namespace {
uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

class MockDataset : public Dataset {
 public:
  MockDataset(int64_t seq_len, int64_t num_samples, int64_t vocab, uint64_t seed, const LengthLimit& length)
      : vocab_(static_cast<uint64_t>(vocab)), seed_(mix64(seed)) {
    if (seq_len < 2) throw RecipeError("mock dataset: seq_len must be >= 2");
    if (num_samples < 1) throw RecipeError("mock dataset: num_samples must be >= 1");
    if (vocab < 1) throw RecipeError("mock dataset: vocab_size must be >= 1");
    // Every sample has seq_len tokens, so the length limit does the same to all of them: apply it to one
    // probe sample and report it for all (a limit that drops every sample is a DataError, as for any kind).
    Sample probe;
    probe.input_ids.assign(static_cast<size_t>(seq_len), 0);
    probe.labels = probe.input_ids;
    LengthLimitStats one;
    const bool kept = limit_sample(probe, length, one);
    len_ = static_cast<int64_t>(probe.input_ids.size());
    const int64_t n = num_samples;
    LengthLimitStats all{n, one.truncated * n, one.dropped * n, one.kept_long * n};
    report_length_limit(all, length, name(), kept ? static_cast<size_t>(n) : 0);
    size_ = kept ? static_cast<size_t>(n) : 0;
  }
  size_t size() const override { return size_; }
  Sample get(size_t i) const override {
    if (i >= size_) throw DataError("mock: sample " + std::to_string(i) + " of " + std::to_string(size_));
    Sample s;
    s.input_ids.resize(static_cast<size_t>(len_));
    const uint64_t base = mix64(seed_ ^ mix64(static_cast<uint64_t>(i)));
    for (size_t t = 0; t < s.input_ids.size(); ++t) {
      const uint64_t h = mix64(base + t);
      s.input_ids[t] = static_cast<int32_t>((static_cast<unsigned __int128>(h) * vocab_) >> 64);
    }
    s.labels = s.input_ids;
    return s;
  }
  std::string name() const override { return "mock"; }

 private:
  uint64_t vocab_, seed_;
  int64_t len_ = 0;
  size_t size_ = 0;
};
}  // namespace

std::unique_ptr<Dataset> make_mock(int64_t seq_len, int64_t num_samples, int64_t vocab, uint64_t seed,
                                   const LengthLimit& length) {
  return std::make_unique<MockDataset>(seq_len, num_samples, vocab, seed, length);
}

}  // namespace am
