// NVTX ranges (trace.h). nvtxRangePushA copies the string, so a stack buffer is enough for formatted names.
#include "ops/trace.h"

#include <cstdio>

#include <cstdlib>
#include <map>

#ifdef AM_WITH_CUDA
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include "backend/cuda/context.h"
#endif

namespace am::ops {

#ifdef AM_WITH_CUDA
TraceRange::TraceRange(const char* name) { nvtxRangePushA(name); }
TraceRange::TraceRange(const char* prefix, int64_t index, const char* suffix) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "%s %lld %s", prefix, static_cast<long long>(index), suffix);
  nvtxRangePushA(buf);
}
TraceRange::~TraceRange() { nvtxRangePop(); }
#else
TraceRange::TraceRange(const char*) {}
TraceRange::TraceRange(const char*, int64_t, const char*) {}
TraceRange::~TraceRange() {}
#endif

// ---- TimedRange ----

namespace {

[[maybe_unused]] std::string timed_key(const char* prefix, const char* suffix) { return std::string(prefix) + " " + suffix; }

#ifdef AM_WITH_CUDA
struct TimeBook {
  bool on = false;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> events;  // one pair per range, reused across resets
  std::vector<std::string> keys;                              // of each pending pair
  int64_t pending = 0;
  std::map<std::string, std::pair<double, int64_t>> totals;

  TimeBook() {
    const char* e = std::getenv("AM_TRACE_TIMES");
    on = e && std::string(e) == "1";
  }
  // Folds the pending pairs into the totals (waits for the last one).
  void fold() {
    if (pending == 0) return;
    cudaEventSynchronize(events[static_cast<size_t>(pending - 1)].second);
    for (int64_t i = 0; i < pending; ++i) {
      float ms = 0.f;
      if (cudaEventElapsedTime(&ms, events[static_cast<size_t>(i)].first, events[static_cast<size_t>(i)].second) == cudaSuccess) {
        auto& t = totals[keys[static_cast<size_t>(i)]];
        t.first += ms;
        t.second += 1;
      }
    }
    pending = 0;
  }
  int64_t begin(std::string key) {
    if (pending == 4096) fold();  // bounded: a long run folds as it goes
    if (static_cast<size_t>(pending) == events.size()) {
      cudaEvent_t a, b;
      if (cudaEventCreate(&a) != cudaSuccess || cudaEventCreate(&b) != cudaSuccess) return -1;
      events.emplace_back(a, b);
      keys.emplace_back();
    }
    keys[static_cast<size_t>(pending)] = std::move(key);
    cudaEventRecord(events[static_cast<size_t>(pending)].first, cuda::default_context().stream());
    return pending++;
  }
  void end(int64_t slot) {
    if (slot >= 0 && slot < pending) cudaEventRecord(events[static_cast<size_t>(slot)].second, cuda::default_context().stream());
  }
};
TimeBook& book() {
  static TimeBook b;
  return b;
}
#endif

}  // namespace

#ifdef AM_WITH_CUDA
TimedRange::TimedRange(const char* name) : nvtx_(name) {
  if (book().on) slot_ = book().begin(name);
}
TimedRange::TimedRange(const char* prefix, int64_t index, const char* suffix) : nvtx_(prefix, index, suffix) {
  if (book().on) slot_ = book().begin(timed_key(prefix, suffix));
}
TimedRange::~TimedRange() {
  if (slot_ >= 0) book().end(slot_);
}
bool trace_times_enabled() { return book().on; }
void trace_times_reset() {
  if (!book().on) return;
  book().fold();
  book().totals.clear();
}
std::vector<std::pair<std::string, std::pair<double, int64_t>>> trace_times() {
  if (!book().on) return {};
  book().fold();
  return {book().totals.begin(), book().totals.end()};
}
#else
TimedRange::TimedRange(const char* name) : nvtx_(name) {}
TimedRange::TimedRange(const char* prefix, int64_t index, const char* suffix) : nvtx_(prefix, index, suffix) {}
TimedRange::~TimedRange() {}
bool trace_times_enabled() { return false; }
void trace_times_reset() {}
std::vector<std::pair<std::string, std::pair<double, int64_t>>> trace_times() { return {}; }
#endif

}  // namespace am::ops
