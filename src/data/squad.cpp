// `squad`: SQuAD v1.1/v2 JSON (data[].paragraphs[].qas[]) or JSONL {context, question, answers}, formatted
// as NeMo AutoModel's make_squad_dataset: prompt "Context: {c} Question: {q} Answer: " and the first answer
// (stripped); with a chat template a user/assistant conversation (answer-only loss, eos appended when the
// rendering does not end with it), otherwise prompt + answer + eos with loss on the answer tokens.
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "data/datasets_impl.h"
#include "data/text_common.h"

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

std::vector<QA> read_squad(const std::string& path, int64_t limit) {
  std::ifstream f(path);
  if (!f) throw IoError("dataset file not found or unreadable: " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  std::vector<QA> out;
  // Whole-file SQuAD JSON ({"data": [...]}) or JSONL of flat rows.
  nlohmann::ordered_json whole;
  bool is_whole = false;
  try {
    whole = nlohmann::ordered_json::parse(text);
    is_whole = whole.is_object() && whole.contains("data");
  } catch (const nlohmann::json::parse_error&) {
  }
  if (is_whole) {
    if (!whole["data"].is_array()) throw DataError(path + ": \"data\" must be a list");
    for (size_t a = 0; a < whole["data"].size(); ++a) {
      const auto& art = whole["data"][a];
      if (!art.contains("paragraphs") || !art["paragraphs"].is_array())
        throw DataError(path + ": data[" + std::to_string(a) + "] has no \"paragraphs\" list");
      for (size_t p = 0; p < art["paragraphs"].size(); ++p) {
        const auto& par = art["paragraphs"][p];
        const std::string pat = path + ": data[" + std::to_string(a) + "].paragraphs[" + std::to_string(p) + "]";
        std::string ctx = str_field(par, "context", pat, true);
        if (!par.contains("qas") || !par["qas"].is_array()) throw DataError(pat + ": missing \"qas\" list");
        for (size_t q = 0; q < par["qas"].size(); ++q) {
          if (limit > 0 && static_cast<int64_t>(out.size()) >= limit) return out;
          const std::string at = pat + ".qas[" + std::to_string(q) + "]";
          const auto& qa = par["qas"][q];
          out.push_back({at, ctx, str_field(qa, "question", at, true), first_answer(qa, at)});
        }
      }
    }
    return out;
  }
  for (auto& [at, j] : read_json_rows(path, limit)) {
    if (!j.is_object()) throw DataError(at + ": expected an object {context, question, answers}");
    out.push_back({at, str_field(j, "context", at, false), str_field(j, "question", at, true), first_answer(j, at)});
  }
  return out;
}
}  // namespace

std::unique_ptr<Dataset> make_squad(const TextDatasetOptions& o) {
  TextTokenizer tt = TextTokenizer::load(o);
  std::vector<Sample> samples;
  for (auto& qa : read_squad(o.path, o.limit)) {
    const std::string prompt = "Context: " + qa.context + " Question: " + qa.question + " Answer: ";
    if (tt.tmpl) {
      nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
      msgs.push_back({{"role", "user"}, {"content", prompt}});
      msgs.push_back({{"role", "assistant"}, {"content", qa.answer}});
      Sample s = encode_chat(tt, msgs, nlohmann::ordered_json::object(), qa.at);
      append_eos_if_missing(tt, s);
      samples.push_back(std::move(s));
    } else {
      samples.push_back(encode_prompt_completion(tt, prompt, qa.answer, true));
    }
  }
  return finish_text_dataset("squad(" + o.path + ")", std::move(samples), o);
}

}  // namespace am
