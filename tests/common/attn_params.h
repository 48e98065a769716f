// The parameters of a causal attention call for the attention tests (tests/gpu/attention_test_util.h) and
// micro-benchmarks (bench/gpu/attention_bench_util.h): one copy, so both build their calls the same way.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/attn_params.h"

namespace am::test {

// Causal attention over B x T tokens, nh query heads sharing nkv key/value heads of D (v: Dv, 0 or D meaning the
// same), scale 1 / sqrt(D), sliding window and soft-capping as given (0: none); no segment ids, no sinks.
inline AttnParams attn_params(int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t D, int64_t Dv = 0,
                              int64_t window = 0, float softcap = 0.f) {
  return AttnParams{.batch = B,
                    .seq = T,
                    .n_heads = nh,
                    .n_kv_heads = nkv,
                    .head_dim = D,
                    .scale = 1.f / std::sqrt(static_cast<float>(D)),
                    .sliding_window = window,
                    .v_head_dim = Dv == D ? 0 : Dv,
                    .softcap = softcap};
}

}  // namespace am::test
