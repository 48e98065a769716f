#include "core/log.h"

#include <cstdio>

namespace am::log {
static bool g_quiet = false;
static int g_rank = 0;
static void (*g_before)() = nullptr;
void set_before_print(void (*fn)()) { g_before = fn; }
void set_quiet(bool q) { g_quiet = q; }
void set_rank(int rank) { g_rank = rank; }
void info(const std::string& msg) {
  if (g_quiet || g_rank != 0) return;
  if (g_before) g_before();
  std::fprintf(stderr, "%s\n", msg.c_str());
}
void warn(const std::string& msg) {
  if (g_rank != 0) return;
  if (g_before) g_before();
  std::fprintf(stderr, "warning: %s\n", msg.c_str());
}
}  // namespace am::log
