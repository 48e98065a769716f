// NVTX ranges: name the host-side spans of a training step so that an Nsight Systems trace reads like the
// code ("layer 3 fwd", "attention bwd", "lm_head+ce", "optimizer"). In a CUDA build they are nvtx3 ranges
// (header-only, from the CUDA toolkit); in a CPU build they compile to nothing. Without a profiler attached
// a range costs a push/pop call that returns at once.
//
//   { ops::TraceRange r("optimizer"); ... }          // a fixed name
//   { ops::TraceRange r("layer", i, "fwd"); ... }      // "layer 3 fwd"
#pragma once
#include <cstdint>

namespace am::ops {

class TraceRange {
 public:
  explicit TraceRange(const char* name);
  TraceRange(const char* prefix, int64_t index, const char* suffix);
  ~TraceRange();
  TraceRange(const TraceRange&) = delete;
  TraceRange& operator=(const TraceRange&) = delete;
};

}  // namespace am::ops
