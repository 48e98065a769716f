// NVTX ranges: name the host-side spans of a training step so that an Nsight Systems trace reads like the
// code ("layer 3 fwd", "attention bwd", "lm_head+ce", "optimizer"). In a CUDA build they are nvtx3 ranges
// (header-only, from the CUDA toolkit); in a CPU build they compile to nothing. Without a profiler attached
// a range costs a push/pop call that returns at once.
//
//   { ops::TraceRange r("optimizer"); ... }          // a fixed name
//   { ops::TraceRange r("layer", i, "fwd"); ... }      // "layer 3 fwd"
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace am::ops {

class TraceRange {
 public:
  explicit TraceRange(const char* name);
  TraceRange(const char* prefix, int64_t index, const char* suffix);
  ~TraceRange();
  TraceRange(const TraceRange&) = delete;
  TraceRange& operator=(const TraceRange&) = delete;
};

// A TraceRange that can also time itself: with AM_TRACE_TIMES=1 in the environment (a CUDA build on a GPU),
// CUDA events around it measure the GPU time of everything enqueued between its start and end, summed per name
// with the index left out ("layer 3 fwd" counts as "layer fwd"). The coarse spans of a step use it (layers, LM
// head, optimizer, micro-batches), so a run can say where its step goes without a profiler attached:
// `automodel bench` adds the table to its JSON. Without the variable it is a TraceRange.
class TimedRange {
 public:
  explicit TimedRange(const char* name);
  TimedRange(const char* prefix, int64_t index, const char* suffix);
  ~TimedRange();
  TimedRange(const TimedRange&) = delete;
  TimedRange& operator=(const TimedRange&) = delete;

 private:
  TraceRange nvtx_;
  int64_t slot_ = -1;  // its pending event pair, -1 when not timing
};

bool trace_times_enabled();
void trace_times_reset();  // forget what was measured so far (bench: after the warm-up steps)
// Milliseconds of GPU time per name, and how many ranges each total sums; waits for the pending events.
std::vector<std::pair<std::string, std::pair<double, int64_t>>> trace_times();

}  // namespace am::ops
