// `mock`: random token ids (seeded), labels = input_ids. For benchmarks and smoke tests. Samples go through
// the same length limit as every dataset (a seq_length/max_length below seq_len truncates or drops them).
#include <random>

#include "core/error.h"
#include "data/datasets_impl.h"
#include "data/length_limit.h"

namespace am {

namespace {
class MockDataset : public Dataset {
 public:
  MockDataset(int64_t seq_len, int64_t num_samples, int64_t vocab, uint64_t seed, const LengthLimit& length) {
    if (seq_len < 2) throw RecipeError("mock dataset: seq_len must be >= 2");
    if (num_samples < 1) throw RecipeError("mock dataset: num_samples must be >= 1");
    if (vocab < 1) throw RecipeError("mock dataset: vocab_size must be >= 1");
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(vocab - 1));
    samples_.resize(num_samples);
    for (auto& s : samples_) {
      s.input_ids.resize(seq_len);
      for (auto& t : s.input_ids) t = dist(rng);
      s.labels = s.input_ids;
    }
    apply_length_limit(samples_, length, name());
  }
  size_t size() const override { return samples_.size(); }
  const Sample& get(size_t i) const override { return samples_.at(i); }
  std::string name() const override { return "mock"; }

 private:
  std::vector<Sample> samples_;
};
}  // namespace

std::unique_ptr<Dataset> make_mock(int64_t seq_len, int64_t num_samples, int64_t vocab, uint64_t seed,
                                   const LengthLimit& length) {
  return std::make_unique<MockDataset>(seq_len, num_samples, vocab, seed, length);
}

}  // namespace am
