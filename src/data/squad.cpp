// `squad`: SQuAD v1.1/v2 JSON (data[].paragraphs[].qas[]) or JSONL {context, question, answers}, formatted
// as NeMo AutoModel's make_squad_dataset: prompt "Context: {c} Question: {q} Answer: " and the first answer
// (stripped); with a chat template a user/assistant conversation (answer-only loss, eos appended when the
// rendering does not end with it), otherwise prompt + answer + eos with loss on the answer tokens.
#include <optional>

#include "data/source.h"

#include "core/error.h"
#include "data/datasets_impl.h"
#include "data/text_common.h"
#include "io/json_bounded.h"

namespace am {

namespace {
struct QA {
  std::string at, context, question, answer;
};

std::string strip(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  size_t a = s.find_first_not_of(ws);
  if (a == std::string::npos) return "";
  return s.substr(a, s.find_last_not_of(ws) - a + 1);
}

std::string str_field(const nlohmann::ordered_json& j, const char* key, const std::string& at, bool required) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) throw DataError(at + ": missing \"" + key + "\"");
    return "";
  }
  if (!j[key].is_string()) throw DataError(at + ": \"" + key + "\" must be a string");
  return j[key].get<std::string>();
}

// First answer text: answers = {"text": [...]} (HF datasets) or [{"text": ...}, ...] (SQuAD JSON).
std::string first_answer(const nlohmann::ordered_json& j, const std::string& at) {
  if (!j.contains("answers")) throw DataError(at + ": missing \"answers\"");
  const auto& a = j["answers"];
  if (a.is_object() && a.contains("text") && a["text"].is_array()) {
    if (a["text"].empty()) return "";
    if (!a["text"][0].is_string()) throw DataError(at + ": answers.text[0] must be a string");
    return strip(a["text"][0].get<std::string>());
  }
  if (a.is_array()) {
    if (a.empty()) return "";
    if (!a[0].is_object() || !a[0].contains("text") || !a[0]["text"].is_string())
      throw DataError(at + ": answers[0] must be an object with a string \"text\"");
    return strip(a[0]["text"].get<std::string>());
  }
  throw DataError(at + ": \"answers\" must be {\"text\": [...]} or a list of {\"text\": ...}");
}

// A SQuAD JSON file ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}, parsed from the stream) read
// as one row per question: {"context", "question", "answers"} at "file: data[a].paragraphs[p].qas[q]".
class SquadJsonFile : public RowFile {
 public:
  SquadJsonFile(std::string path, nlohmann::ordered_json doc) : path_(std::move(path)), doc_(std::move(doc)) {}
  int64_t num_rows() override {
    int64_t n = 0;
    walk(0, -1, [&](JsonRow&&) { ++n; return true; }, false);
    return n;
  }
  int64_t read(int64_t begin, int64_t end, const std::function<bool(JsonRow&&)>& fn) override {
    return walk(begin, end, fn, true);
  }

 private:
  // Rows [begin, end) to fn (built only when `build`); the row count when the walk reached the end, else -1.
  int64_t walk(int64_t begin, int64_t end, const std::function<bool(JsonRow&&)>& fn, bool build) {
    const auto& data = doc_["data"];
    if (!data.is_array()) throw DataError(path_ + ": \"data\" must be a list");
    int64_t i = 0;
    for (size_t a = 0; a < data.size(); ++a) {
      const auto& art = data[a];
      if (!art.is_object() || !art.contains("paragraphs") || !art["paragraphs"].is_array())
        throw DataError(path_ + ": data[" + std::to_string(a) + "] has no \"paragraphs\" list");
      for (size_t p = 0; p < art["paragraphs"].size(); ++p) {
        const auto& par = art["paragraphs"][p];
        const std::string pat = path_ + ": data[" + std::to_string(a) + "].paragraphs[" + std::to_string(p) + "]";
        if (!par.is_object()) throw DataError(pat + ": expected an object");
        const std::string ctx = str_field(par, "context", pat, true);
        if (!par.contains("qas") || !par["qas"].is_array()) throw DataError(pat + ": missing \"qas\" list");
        for (size_t q = 0; q < par["qas"].size(); ++q, ++i) {
          if (end >= 0 && i >= end) return -1;
          if (i < begin) continue;
          JsonRow row;
          row.at = pat + ".qas[" + std::to_string(q) + "]";
          const auto& qa = par["qas"][q];
          if (!qa.is_object()) throw DataError(row.at + ": expected an object");
          if (build) {
            row.value = nlohmann::ordered_json::object();
            row.value["context"] = ctx;
            if (qa.contains("question")) row.value["question"] = qa["question"];
            if (qa.contains("answers")) row.value["answers"] = qa["answers"];
          }
          if (!fn(std::move(row))) return -1;
        }
      }
    }
    return i;
  }
  std::string path_;
  nlohmann::ordered_json doc_;
};

// The SQuAD JSON reader for a file that holds one {"data": [...]} document; nullptr for JSON lines (and
// anything else, which the JSON lines reader reports line by line).
std::unique_ptr<RowFile> open_squad_json(const DataFile& f) {
  if (f.format != DataFormat::Json && f.format != DataFormat::Text) return nullptr;
  const std::string first = first_nonblank_line(f.path);
  size_t k = first.find_first_not_of(" \t\r\f\v\xEF\xBB\xBF");
  if (k == std::string::npos || first[k] != '{') return nullptr;
  // A first line that is a whole object without "data" is a JSONL row; otherwise try the whole file.
  try {
    auto j = io::parse_json_bounded<nlohmann::ordered_json>(first, f.path);
    if (!j.is_object() || !j.contains("data")) return nullptr;
  } catch (const FormatError&) {
  }
  auto whole = parse_json_file(f.path);
  if (!whole || !whole->is_object() || !whole->contains("data")) return nullptr;  // JSONL reports its bad line
  return std::make_unique<SquadJsonFile>(f.path, std::move(*whole));
}

Sample encode_qa(const TextTokenizer& tt, const QA& qa) {
  const std::string prompt = "Context: " + qa.context + " Question: " + qa.question + " Answer: ";
  if (tt.tmpl) {
    nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
    msgs.push_back({{"role", "user"}, {"content", prompt}});
    msgs.push_back({{"role", "assistant"}, {"content", qa.answer}});
    Sample s = encode_chat(tt, msgs, nlohmann::ordered_json::object(), qa.at);
    append_eos_if_missing(tt, s);
    return s;
  }
  return encode_prompt_completion(tt, prompt, qa.answer, true);
}
}  // namespace

std::unique_ptr<Dataset> make_squad(const TextDatasetOptions& o) {
  auto samples = tokenise_cached(o, "squad", "", true, [&] {
    const auto tt = TextTokenizer::shared(o);
    return map_json_rows(o, [&](const JsonRow& r) {
      const auto& j = r.value;
      if (!j.is_object()) throw DataError(r.at + ": expected an object {context, question, answers}");
      return encode_qa(*tt, {r.at, str_field(j, "context", r.at, false), str_field(j, "question", r.at, true),
                             first_answer(j, r.at)});
    }, open_squad_json);
  });
  return finish_text_dataset("squad(" + o.path + ")", std::move(samples), o);
}

}  // namespace am
