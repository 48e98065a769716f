#include "models/kv_cache.h"

#include <string>

#include "core/error.h"
#include "ops/ops.h"

namespace am {

KvCache::KvCache(const io::ModelConfig& cfg, const ExecContext& ex, int64_t capacity)
      : capacity_(capacity),
        n_kv_heads_(cfg.num_key_value_heads),
        head_dim_(cfg.deepseek ? cfg.ds.qk_head_dim() : cfg.head_dim),  // MLA: per-head keys of nope + rope dims
        v_dim_(cfg.deepseek ? cfg.ds.v_head_dim : cfg.head_dim),
        ex_(ex) {
  if (capacity <= 0) throw DataError("KV cache: capacity must be positive, got " + std::to_string(capacity));
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    // Uninitialised: a row is only read after write() filled it.
    k_.push_back(ex.empty({capacity, n_kv_heads_, head_dim_}));
    v_.push_back(ex.empty({capacity, n_kv_heads_, v_dim_}));
  }
}

size_t KvCache::bytes() const {
  size_t b = 0;
  for (size_t l = 0; l < k_.size(); ++l) b += k_[l].nbytes() + v_[l].nbytes();
  return b;
}

void KvCache::write(int64_t layer, const Tensor& k_new, const Tensor& v_new) {
  const int64_t n = k_new.numel() / (n_kv_heads_ * head_dim_);
  if (layer < 0 || layer >= num_layers())
    throw DataError("KV cache: layer " + std::to_string(layer) + " of " + std::to_string(num_layers()));
  if (length_ + n > capacity_)
    throw DataError("KV cache: " + std::to_string(length_) + " + " + std::to_string(n) + " tokens exceed its capacity of " +
                    std::to_string(capacity_));
  Tensor kd = k_[static_cast<size_t>(layer)].slice_rows(length_, length_ + n);
  Tensor vd = v_[static_cast<size_t>(layer)].slice_rows(length_, length_ + n);
  ops::copy_(kd, k_new);
  ops::copy_(vd, v_new);
}

Tensor KvCache::view(const Tensor& t, int64_t layer, int64_t rows, int64_t dim) const {
  if (rows < 0 || rows > capacity_)
    throw DataError("KV cache: " + std::to_string(rows) + " rows requested of " + std::to_string(capacity_) +
                    " (layer " + std::to_string(layer) + ")");
  return t.slice_rows(0, rows).view({1, rows, n_kv_heads_, dim});
}

Tensor KvCache::keys(int64_t layer, int64_t rows) const {
  return view(k_.at(static_cast<size_t>(layer)), layer, rows, head_dim_);
}
Tensor KvCache::values(int64_t layer, int64_t rows) const {
  return view(v_.at(static_cast<size_t>(layer)), layer, rows, v_dim_);
}

void KvCache::reserve(int64_t capacity) {
  if (capacity <= capacity_) return;
  for (auto* layers : {&k_, &v_})
    for (Tensor& t : *layers) {
      Tensor bigger = ex_.empty({capacity, n_kv_heads_, t.dim(2)});
      if (length_ > 0) {
        Tensor dst = bigger.slice_rows(0, length_);
        ops::copy_(dst, t.slice_rows(0, length_));
      }
      t = bigger;
    }
  capacity_ = capacity;
}

void KvCache::advance(int64_t n) {
  if (n < 0 || length_ + n > capacity_)
    throw DataError("KV cache: cannot advance by " + std::to_string(n) + " at length " + std::to_string(length_) +
                    " (capacity " + std::to_string(capacity_) + ")");
  length_ += n;
}

}  // namespace am
