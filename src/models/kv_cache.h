// The key/value cache of incremental decoding (automodel generate): per decoder layer, the keys and values
// of every token of one sequence seen so far, exactly as attention reads them (after q/k norm and RoPE).
//
//   k[l], v[l]: [capacity, nkv, D] in the model's activation dtype on its device (fp32 on the CPU, bf16 on
//   CUDA); rows [0, length()) hold positions 0 .. length() - 1. DeepSeek's MLA caches the per-head keys and
//   values it attends over: k [capacity, nh, qk_nope + qk_rope], v [capacity, nh, v_head_dim].
//
// One step of DecoderLM::forward_incremental runs n new tokens through every layer: layer l writes their
// n rows at [length(), length() + n) (write) and attends over rows [0, length() + n) (keys/values); once
// every layer has done so the step calls advance(n). The capacity is allocated up front and grown only by
// reserve() (the generation loop doubles it when full, so --max-new-tokens 1000000 does not allocate a
// million rows at once); sliding-window layers keep every row too and the attention op masks what the
// window hides.
#pragma once
#include <cstdint>
#include <vector>

#include "io/model_config.h"
#include "models/exec.h"

namespace am {

class KvCache {
 public:
  KvCache() = default;
  // Room for `capacity` tokens in each of cfg's layers, on ex's device in ex's activation dtype.
  KvCache(const io::ModelConfig& cfg, const ExecContext& ex, int64_t capacity);

  int64_t length() const { return length_; }      // tokens cached (= the position of the next one)
  int64_t capacity() const { return capacity_; }
  int64_t num_layers() const { return static_cast<int64_t>(k_.size()); }
  size_t bytes() const;                           // device memory held by all layers

  // Layer `layer`: copies k_new / v_new [n, nkv, D] (any float dtype; converted) into rows
  // [length(), length() + n). Throws DataError when the cache would overflow.
  void write(int64_t layer, const Tensor& k_new, const Tensor& v_new);
  // Layer `layer`'s first `rows` rows as [1, rows, nkv, D] views (no copy), for attention.
  Tensor keys(int64_t layer, int64_t rows) const;
  Tensor values(int64_t layer, int64_t rows) const;
  // Every layer has written n rows at length(): they now belong to the sequence.
  void advance(int64_t n);
  // Grows every layer to `capacity` rows (no-op when it is not larger), keeping the cached rows: one copy
  // of the filled part, so growing geometrically costs O(1) amortised per token.
  void reserve(int64_t capacity);
  // Forget the sequence (keeps the memory).
  void clear() { length_ = 0; }

 private:
  Tensor view(const Tensor& t, int64_t layer, int64_t rows, int64_t dim) const;
  std::vector<Tensor> k_, v_;  // per layer [capacity, nkv, D], [capacity, nkv, Dv]
  int64_t capacity_ = 0, length_ = 0, n_kv_heads_ = 0, head_dim_ = 0, v_dim_ = 0;
  ExecContext ex_;  // where the rows live (reserve allocates there)
};

}  // namespace am
