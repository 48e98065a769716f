// `tokenized_jsonl`: one JSON object per line, {"input_ids": [...], "labels": [...]} (labels optional =
// input_ids). Every line is validated up front so a bad line fails before training starts, as file:line.
// seq_length / max_length (data/length_limit.h) truncate or drop each row as it is read.
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/datasets_impl.h"
#include "data/length_limit.h"
#include "data/text_common.h"
#include "io/json_bounded.h"

namespace am {

namespace {
class TokenizedJsonl : public Dataset {
 public:
  TokenizedJsonl(const std::string& path, const DatasetContext& ctx, int64_t limit, const LengthLimit& length)
      : path_(path) {
    LengthLimitStats st;
    int64_t rows = 0;
    InputFile f(path);  // streamed line by line (plain or .bz2); only the token ids are kept
    std::string line;
    int64_t lineno = 0;
    while (f.getline(line)) {
      ++lineno;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines are skipped
      if (limit > 0 && rows >= limit) break;
      ++rows;
      const std::string at = path + ":" + std::to_string(lineno);
      nlohmann::json j;
      try {
        j = io::parse_json_bounded(line, at + ": malformed JSON line");
      } catch (const FormatError& e) {  // bad syntax or too deep: a data error naming file:line
        throw DataError(std::string(e.what()).substr(0, 240));  // "<file>:<line>: malformed JSON line: ..."
      }
      if (!j.is_object() || !j.contains("input_ids"))
        throw DataError(at + ": expected an object with \"input_ids\" (and optionally \"labels\")");
      Sample s;
      s.input_ids = read_ids(j["input_ids"], at, "input_ids", ctx.vocab_size, false);
      if (s.input_ids.empty()) throw DataError(at + ": \"input_ids\" is empty");
      if (j.contains("labels") && !j["labels"].is_null()) {
        s.labels = read_ids(j["labels"], at, "labels", ctx.vocab_size, true);
        if (s.labels.size() != s.input_ids.size())
          throw DataError(at + ": \"labels\" has " + std::to_string(s.labels.size()) + " entries but \"input_ids\" has " +
                          std::to_string(s.input_ids.size()));
      } else {
        s.labels = s.input_ids;
      }
      if (limit_sample(s, length, st)) samples_.push_back(std::move(s));
    }
    report_length_limit(st, length, name(), samples_.size());
    if (samples_.empty()) throw DataError(path + ": the dataset has no samples");
  }
  size_t size() const override { return samples_.size(); }
  Sample get(size_t i) const override { return samples_.at(i); }
  std::string name() const override { return "tokenized_jsonl(" + path_ + ")"; }

 private:
  static std::vector<int32_t> read_ids(const nlohmann::json& a, const std::string& at, const char* key, int64_t vocab,
                                       bool allow_ignore) {
    if (!a.is_array()) throw DataError(at + ": \"" + key + "\" must be a list of integers");
    std::vector<int32_t> out;
    out.reserve(a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      const auto& v = a[i];
      if (!v.is_number_integer())
        throw DataError(at + ": " + key + "[" + std::to_string(i) + "] is not an integer: " + v.dump());
      int64_t id = v.get<int64_t>();
      if (allow_ignore && id == -100) {
        out.push_back(-100);
        continue;
      }
      if (id < 0 || (vocab > 0 && id >= vocab))
        throw DataError(at + ": token id " + std::to_string(id) + " at " + key + "[" + std::to_string(i) +
                        "] is out of range for vocab_size " + std::to_string(vocab));
      out.push_back(static_cast<int32_t>(id));
    }
    return out;
  }
  std::string path_;
  std::vector<Sample> samples_;
};
}  // namespace

std::unique_ptr<Dataset> make_tokenized_jsonl(const std::string& path, const DatasetContext& ctx, int64_t limit,
                                              const LengthLimit& length) {
  return std::make_unique<TokenizedJsonl>(path, ctx, limit, length);
}

}  // namespace am
