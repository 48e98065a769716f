// Minimal logging to stderr (rank 0 prints; warnings are one line each).
#pragma once
#include <string>

namespace am::log {
void info(const std::string& msg);
void warn(const std::string& msg);
void set_quiet(bool q);
}  // namespace am::log
