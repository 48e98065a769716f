// Every JSON the engine reads comes from files a user did not write (model repos, datasets): parse with a
// nesting limit, so a 100k-deep document is a clear FormatError naming where it came from, not a stack
// overflow in a recursive copy or destructor later. nlohmann's parser is iterative; the callback stops it
// before a too-deep value is built.
#pragma once
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace am::io {

constexpr int kMaxJsonDepth = 256;

// `where` names the source in errors ("tokenizer.json", "data.jsonl:12"). Syntax errors are FormatError
// too, with nlohmann's message.
template <class Json = nlohmann::json>
Json parse_json_bounded(std::string_view text, const std::string& where, int max_depth = kMaxJsonDepth) {
  auto cb = [&](int depth, typename Json::parse_event_t, Json&) {
    if (depth > max_depth)
      throw FormatError(where + ": JSON nested deeper than " + std::to_string(max_depth) + " levels");
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), cb);
  } catch (const typename Json::exception& e) {
    throw FormatError(where + ": " + e.what());
  }
}

// Python's json writes float('inf') / nan as the bare tokens Infinity, -Infinity, NaN (not JSON; e.g. HF
// NemotronHConfig's time_step_limit (0.0, inf) in config.json). quote_nonfinite turns each such token outside
// a string into the string "__nonfinite__<token>" so the file parses; unquote_nonfinite puts the bare tokens
// back into a dump (the exported config.json is then what Python wrote).
inline std::string quote_nonfinite(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool in_str = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_str) {
      out += ch;
      if (ch == '\\' && i + 1 < text.size()) out += text[++i];
      else if (ch == '"') in_str = false;
      continue;
    }
    if (ch == '"') in_str = true;
    bool hit = false;
    for (std::string_view tok : {std::string_view("-Infinity"), std::string_view("Infinity"), std::string_view("NaN")})
      if (text.substr(i, tok.size()) == tok) {
        out += "\"__nonfinite__";
        out += tok;
        out += '"';
        i += tok.size() - 1;
        hit = true;
        break;
      }
    if (!hit) out += ch;
  }
  return out;
}
inline std::string unquote_nonfinite(std::string text) {
  for (std::string_view tok : {std::string_view("-Infinity"), std::string_view("Infinity"), std::string_view("NaN")}) {
    const std::string q = "\"__nonfinite__" + std::string(tok) + "\"";
    for (size_t at = text.find(q); at != std::string::npos; at = text.find(q, at)) text.replace(at, q.size(), tok);
  }
  return text;
}

}  // namespace am::io
