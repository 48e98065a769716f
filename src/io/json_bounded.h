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

}  // namespace am::io
