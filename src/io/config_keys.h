// Typed access to one config.json object (model_config.cpp and the family parsers in their own files,
// model_config_deepseek.cpp, model_config_nemotron_h.cpp): absent or null keys take the caller's default (or,
// in the required forms, are a FormatError), anything else must have the right type or a FormatError names
// the file, the full key and what was found.
#pragma once
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace am::io {

struct ConfigKeys {
  const nlohmann::json& j;
  std::string file;
  std::string prefix = "";  // "" or e.g. "rope_scaling." (named in messages: "rope_scaling.factor")

  bool present(const char* k) const { return j.contains(k) && !j.at(k).is_null(); }
  [[noreturn]] void bad(const char* k, const std::string& want) const {
    std::string got = j.contains(k) ? j.at(k).dump() : "absent";
    if (got.size() > 80) got = got.substr(0, 77) + "...";
    throw FormatError(file + ": key '" + prefix + k + "' must be " + want + ", got " + got);
  }
  [[noreturn]] void missing(const char* k) const {
    throw FormatError(file + ": missing required key '" + prefix + k + "'");
  }
  [[noreturn]] void bad_or_missing(const char* k, const std::string& want) const {
    if (!present(k)) missing(k);
    bad(k, want);
  }
  // ---- required (missing: FormatError) and defaulted (absent or null: def) forms ----
  double num(const char* k) const {
    if (!present(k)) missing(k);
    if (!j.at(k).is_number()) bad(k, "a number");
    return j.at(k).get<double>();
  }
  double num(const char* k, double def) const { return present(k) ? num(k) : def; }
  std::optional<double> opt_num(const char* k) const {
    return present(k) ? std::optional<double>(num(k)) : std::nullopt;
  }
  int64_t integer(const char* k) const {
    if (!present(k)) missing(k);
    const nlohmann::json& v = j.at(k);
    // Some writers emit 4096.0; accept a float only when it is integral.
    if (v.is_number_float()) {
      double d = v.get<double>();
      if (std::floor(d) != d || std::fabs(d) > 9.0e15) bad(k, "an integer");
      return static_cast<int64_t>(d);
    }
    if (!v.is_number_integer()) bad(k, "an integer");
    return v.get<int64_t>();
  }
  int64_t integer(const char* k, int64_t def) const { return present(k) ? integer(k) : def; }
  // An integer in [lo, hi] (defaults: a positive size far above any real model, so that a typo fails here,
  // at once, instead of after allocating the model).
  int64_t bounded(const char* k, int64_t def, int64_t lo = 1, int64_t hi = int64_t(1) << 40) const {
    if (!present(k)) return def;
    const nlohmann::json& v = j.at(k);
    const double d = v.is_number() ? v.get<double>() : NAN;
    if (!v.is_number() || std::floor(d) != d || d < static_cast<double>(lo) || d > static_cast<double>(hi))
      bad(k, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return static_cast<int64_t>(d);
  }
  int64_t positive(const char* k) const {
    int64_t v = integer(k);
    if (v <= 0) bad(k, "a positive integer");
    return v;
  }
  int64_t positive(const char* k, int64_t def) const { return present(k) ? positive(k) : def; }
  // A size: positive and at most `cap`.
  int64_t size(const char* k, int64_t cap) const {
    int64_t v = integer(k);
    if (v <= 0 || v > cap) bad(k, "a positive integer at most " + std::to_string(cap));
    return v;
  }
  int64_t size(const char* k, int64_t def, int64_t cap) const { return present(k) ? size(k, cap) : def; }
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
