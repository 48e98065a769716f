// Typed access to one config.json object for the family parsers in their own files (model_config_deepseek.cpp,
// model_config_nemotron_h.cpp): absent or null keys take the caller's default, anything else must have the
// right type or a FormatError names the file, the key and what was found.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace am::io {

struct ConfigKeys {
  const nlohmann::json& j;
  const std::string& file;
  bool present(const char* k) const { return j.contains(k) && !j.at(k).is_null(); }
  [[noreturn]] void bad(const char* k, const std::string& want) const {
    std::string got = j.contains(k) ? j.at(k).dump() : "absent";
    if (got.size() > 80) got = got.substr(0, 77) + "...";
    throw FormatError(file + ": key '" + k + "' must be " + want + ", got " + got);
  }
  int64_t integer(const char* k, int64_t def, int64_t lo = 1, int64_t hi = int64_t(1) << 40) const {
    if (!present(k)) return def;
    const nlohmann::json& v = j.at(k);
    const double d = v.is_number() ? v.get<double>() : NAN;
    if (!v.is_number() || std::floor(d) != d || d < static_cast<double>(lo) || d > static_cast<double>(hi))
      bad(k, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return static_cast<int64_t>(d);
  }
  double num(const char* k, double def) const {
    if (!present(k)) return def;
    if (!j.at(k).is_number()) bad(k, "a number");
    return j.at(k).get<double>();
  }
  bool boolean(const char* k, bool def) const {
    if (!present(k)) return def;
    if (!j.at(k).is_boolean()) bad(k, "true or false");
    return j.at(k).get<bool>();
  }
  std::string str(const char* k, const std::string& def) const {
    if (!present(k)) return def;
    if (!j.at(k).is_string()) bad(k, "a string");
    return j.at(k).get<std::string>();
  }
  // a key or its legacy alias (e.g. NemotronHConfig.__post_init__ pops the alias over the field)
  const char* either(const char* k, const char* legacy) const { return present(legacy) ? legacy : k; }
};

}  // namespace am::io
