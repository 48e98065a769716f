// Typed errors. Library code throws these with enough context (file, key, tensor name, line) for a
// user to act on; only the CLI catches them, prints one line and exits with exit_code().
#pragma once
#include <stdexcept>
#include <string>

namespace am {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
  // 2 = usage / recipe error, 1 = anything else (SPEC §1).
  virtual int exit_code() const { return 1; }
};

// Bad command line or bad recipe: exit status 2.
class UsageError : public Error {
 public:
  using Error::Error;
  int exit_code() const override { return 2; }
};
class RecipeError : public UsageError {
 public:
  using UsageError::UsageError;
};

// Files that are missing, truncated or malformed; bad data; runtime failures: exit status 1.
class IoError : public Error {
 public:
  using Error::Error;
};
class FormatError : public Error {
 public:
  using Error::Error;
};
class DataError : public Error {
 public:
  using Error::Error;
};
class ShapeError : public Error {
 public:
  using Error::Error;
};
class DeviceError : public Error {
 public:
  using Error::Error;
};

#define AM_CHECK(cond, ErrType, msg)                      \
  do {                                                    \
    if (!(cond)) throw ErrType(std::string(msg));         \
  } while (0)

}  // namespace am
