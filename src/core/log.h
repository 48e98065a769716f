// Minimal logging to stderr (rank 0 prints; warnings are one line each).
#pragma once
#include <string>

namespace am::log {
void info(const std::string& msg);
void warn(const std::string& msg);
void set_quiet(bool q);
// Ranks other than 0 of a distributed job print nothing through here (rank 0 speaks for the job).
void set_rank(int rank);
}  // namespace am::log
