// NVTX ranges (trace.h). nvtxRangePushA copies the string, so a stack buffer is enough for formatted names.
#include "ops/trace.h"

#include <cstdio>

#ifdef AM_WITH_CUDA
#include <nvtx3/nvToolsExt.h>
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

}  // namespace am::ops
