// automodel tokenize --tokenizer DIR [--add-special-tokens] [--decode] [--skip-special-tokens] --jsonl FILE|-
// Each input line is a JSON string -> output line is the JSON array of token ids. With --decode, each
// input line is a JSON array of ids -> output line is the decoded text as a JSON string.
// Lines are processed in blocks, encoded in parallel, and written in input order.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "io/json_bounded.h"
#include "tokenizer/tokenizer.h"

namespace am {

namespace {
const char* kTokenizeUsage =
    "usage: automodel tokenize --tokenizer DIR [--add-special-tokens] [--decode] [--skip-special-tokens] "
    "--jsonl FILE|-";
}

int cmd_tokenize(int argc, char** argv) {
  std::string dir, input;
  bool add_special = false, decode = false, skip_special = false, have_input = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const std::string& name) -> std::string {
      auto eq = a.find('=');
      if (eq != std::string::npos) return a.substr(eq + 1);
      if (i + 1 >= argc) throw UsageError(name + " needs a value\n" + kTokenizeUsage);
      return argv[++i];
    };
    if (a == "--tokenizer" || a.rfind("--tokenizer=", 0) == 0) dir = value("--tokenizer");
    else if (a == "--jsonl" || a.rfind("--jsonl=", 0) == 0) { input = value("--jsonl"); have_input = true; }
    else if (a == "--add-special-tokens") add_special = true;
    else if (a == "--decode") decode = true;
    else if (a == "--skip-special-tokens") skip_special = true;
    else if (a == "-h" || a == "--help") { std::printf("%s\n", kTokenizeUsage); return 0; }
    else throw UsageError("tokenize: unknown argument '" + a + "'\n" + kTokenizeUsage);
  }
  if (dir.empty()) throw UsageError(std::string("tokenize: --tokenizer DIR is required\n") + kTokenizeUsage);
  if (!have_input || input.empty()) throw UsageError(std::string("tokenize: --jsonl FILE|- is required\n") + kTokenizeUsage);

  tok::Tokenizer tk = tok::Tokenizer::from_dir(dir);

  std::ifstream file;
  std::istream* in = &std::cin;
  std::string name = input == "-" ? "<stdin>" : input;
  if (input != "-") {
    file.open(input, std::ios::binary);
    if (!file) throw IoError("tokenize: cannot open " + input);
    in = &file;
  }
  std::ios::sync_with_stdio(false);

  constexpr size_t kBlock = 4096;
  std::vector<std::string> texts;
  std::vector<std::vector<int32_t>> id_lists;
  std::string line, out;
  size_t lineno = 0;
  bool eof = false;
  std::string pending_error;  // a bad line: the lines before it are still written, then we fail
  while (!eof) {
    texts.clear();
    id_lists.clear();
    while (texts.size() + id_lists.size() < kBlock) {
      if (!std::getline(*in, line)) {
        eof = true;
        break;
      }
      ++lineno;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      std::string where = name + ":" + std::to_string(lineno) + ": ";
      nlohmann::json j;
      try {
        j = io::parse_json_bounded(line, where + "invalid JSON");  // nesting bounded: a deep line is an error
      } catch (const FormatError& e) {
        pending_error = e.what();
      }
      if (!pending_error.empty()) {
        // reported after the lines before it are written
      } else if (!decode) {
        if (j.is_string()) texts.push_back(j.get<std::string>());
        else pending_error = where + "expected a JSON string";
      } else if (!j.is_array()) {
        pending_error = where + "expected a JSON array of token ids";
      } else {
        std::vector<int32_t> ids;
        ids.reserve(j.size());
        for (auto& x : j) {
          if (!x.is_number_integer()) {
            pending_error = where + "expected a JSON array of integer token ids";
            break;
          }
          int64_t v = x.get<int64_t>();
          if (v < INT32_MIN || v > INT32_MAX) {
            pending_error = where + "token id " + std::to_string(v) + " out of range";
            break;
          }
          ids.push_back(static_cast<int32_t>(v));
        }
        if (pending_error.empty()) id_lists.push_back(std::move(ids));
      }
      if (!pending_error.empty()) {
        eof = true;
        break;
      }
    }
    out.clear();
    if (!decode) {
      auto res = tk.encode_batch(texts, add_special);
      for (auto& ids : res) {
        out.push_back('[');
        for (size_t k = 0; k < ids.size(); ++k) {
          if (k) out.push_back(',');
          out += std::to_string(ids[k]);
        }
        out += "]\n";
      }
    } else {
      for (auto& ids : id_lists) {
        out += nlohmann::json(tk.decode(ids, skip_special)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        out.push_back('\n');
      }
    }
    std::fwrite(out.data(), 1, out.size(), stdout);
  }
  std::fflush(stdout);
  if (!pending_error.empty()) throw DataError(pending_error);
  return 0;
}

}  // namespace am
