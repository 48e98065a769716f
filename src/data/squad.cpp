// `squad`: SQuAD v1.1/v2 JSON (data[].paragraphs[].qas[]) or JSONL {context, question, answers}, formatted
// as NeMo AutoModel's make_squad_dataset: prompt "Context: {c} Question: {q} Answer: " and the first answer
// (stripped); with a chat template a user/assistant conversation (answer-only loss, eos appended when the
// rendering does not end with it), otherwise prompt + answer + eos with loss on the answer tokens.
#include <optional>

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

// SQuAD JSON ({"data": [...]}, parsed from the stream) -> its questions in order; std::nullopt when the
// file is JSONL (read row by row by the caller).
std::optional<std::vector<QA>> read_squad_json(const std::string& path, int64_t limit) {
  const std::string first = first_nonblank_line(path);
  size_t k = first.find_first_not_of(" \t\r\f\v\xEF\xBB\xBF");
  if (k == std::string::npos || first[k] != '{') return std::nullopt;
  // A first line that is a whole object without "data" is a JSONL row; otherwise try the whole file.
  try {
    auto j = io::parse_json_bounded<nlohmann::ordered_json>(first, path);
    if (!j.is_object() || !j.contains("data")) return std::nullopt;
  } catch (const FormatError&) {
  }
  auto whole = parse_json_file(path);
  if (!whole || !whole->is_object() || !whole->contains("data")) return std::nullopt;  // JSONL reports its bad line
  std::vector<QA> out;
  const auto& data = (*whole)["data"];
  if (!data.is_array()) throw DataError(path + ": \"data\" must be a list");
  for (size_t a = 0; a < data.size(); ++a) {
    const auto& art = data[a];
    if (!art.is_object() || !art.contains("paragraphs") || !art["paragraphs"].is_array())
      throw DataError(path + ": data[" + std::to_string(a) + "] has no \"paragraphs\" list");
    for (size_t p = 0; p < art["paragraphs"].size(); ++p) {
      const auto& par = art["paragraphs"][p];
      const std::string pat = path + ": data[" + std::to_string(a) + "].paragraphs[" + std::to_string(p) + "]";
      if (!par.is_object()) throw DataError(pat + ": expected an object");
      std::string ctx = str_field(par, "context", pat, true);
      if (!par.contains("qas") || !par["qas"].is_array()) throw DataError(pat + ": missing \"qas\" list");
      for (size_t q = 0; q < par["qas"].size(); ++q) {
        if (limit > 0 && static_cast<int64_t>(out.size()) >= limit) return out;
        const std::string at = pat + ".qas[" + std::to_string(q) + "]";
        const auto& qa = par["qas"][q];
        if (!qa.is_object()) throw DataError(at + ": expected an object");
        out.push_back({at, ctx, str_field(qa, "question", at, true), first_answer(qa, at)});
      }
    }
  }
  return out;
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
  TextTokenizer tt = TextTokenizer::load(o);
  std::vector<Sample> samples;
  if (auto qas = read_squad_json(o.path, o.limit)) {
    samples = parallel_samples(qas->size(), o.num_threads, [&](size_t i) { return encode_qa(tt, (*qas)[i]); });
  } else {
    samples = map_json_rows(o.path, o.limit, o.num_threads, [&](const JsonRow& r) {
      const auto& j = r.value;
      if (!j.is_object()) throw DataError(r.at + ": expected an object {context, question, answers}");
      return encode_qa(tt, {r.at, str_field(j, "context", r.at, false), str_field(j, "question", r.at, true),
                            first_answer(j, r.at)});
    });
  }
  return finish_text_dataset("squad(" + o.path + ")", std::move(samples), o);
}

}  // namespace am
