#include "core/log.h"

#include <cstdio>

namespace am::log {
static bool g_quiet = false;
void set_quiet(bool q) { g_quiet = q; }
void info(const std::string& msg) {
  if (!g_quiet) std::fprintf(stderr, "%s\n", msg.c_str());
}
void warn(const std::string& msg) { std::fprintf(stderr, "warning: %s\n", msg.c_str()); }
}  // namespace am::log
