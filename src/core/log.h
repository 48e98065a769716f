// Minimal logging to stderr (rank 0 prints; warnings are one line each).
#pragma once
#include <string>

namespace am::log {
void info(const std::string& msg);
void warn(const std::string& msg);
void set_quiet(bool q);
// Ranks other than 0 of a distributed job print nothing through here (rank 0 speaks for the job).
void set_rank(int rank);
// Called before every line printed here (the training progress bar clears itself so that the line does not
// land on it); nullptr: none.
void set_before_print(void (*fn)());
}  // namespace am::log
