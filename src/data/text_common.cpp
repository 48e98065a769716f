#include "data/text_common.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/log.h"

namespace am {

TextTokenizer TextTokenizer::load(const std::string& dir, const std::string& chat_template_override) {
  if (dir.empty()) throw IoError("text datasets need a tokenizer folder (model path, model.tokenizer or dataset.tokenizer)");
  TextTokenizer t;
  t.tok = tok::Tokenizer::from_dir(dir);
  if (chat_template_override.empty()) {
    t.tmpl = tok::find_chat_template(dir);
  } else {
    std::string src = chat_template_override;
    std::error_code ec;
    if (src.find("{%") == std::string::npos && src.find("{{") == std::string::npos) {
      std::ifstream f(src);
      if (!f) throw IoError("chat_template file not found or unreadable: " + src);
      std::stringstream ss;
      ss << f.rdbuf();
      src = ss.str();
    }
    t.tmpl = tok::ChatTemplate::from_string(src, tok::special_tokens_of(dir));
    t.tmpl->origin = chat_template_override.size() < 200 ? chat_template_override : "dataset.chat_template";
  }
  return t;
}

static bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// Number of leading tokens of `full` that encode the text prefix `prefix` (the common token prefix of
// encode(prefix) and full).
static size_t token_prefix_len(const tok::Tokenizer& tk, const std::string& prefix, const std::vector<int32_t>& full) {
  auto p = tk.encode(prefix, false);
  size_t n = 0;
  while (n < p.size() && n < full.size() && p[n] == full[n]) ++n;
  return n;
}

Sample encode_chat(const TextTokenizer& tt, const nlohmann::ordered_json& messages, const nlohmann::ordered_json& extra,
                   const std::string& at, bool all_labels) {
  if (!tt.tmpl) throw DataError(at + ": the tokenizer has no chat template");
  const auto& tmpl = *tt.tmpl;
  std::string full;
  try {
    full = tok::render_chat_template(tmpl, messages, false, extra);
  } catch (const Error& e) {
    throw DataError(at + ": chat template: " + e.what());
  }
  Sample s;
  s.input_ids = tt.tok.encode(full, false);
  if (s.input_ids.empty()) throw DataError(at + ": the rendered conversation is empty");
  if (all_labels) {
    s.labels = s.input_ids;
    return s;
  }
  s.labels.assign(s.input_ids.size(), -100);
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i].value("role", "") != "assistant") continue;
    nlohmann::ordered_json head = nlohmann::ordered_json::array(), upto = nlohmann::ordered_json::array();
    for (size_t k = 0; k < i; ++k) head.push_back(messages[k]);
    upto = head;
    upto.push_back(messages[i]);
    std::string pre, cur;
    try {
      pre = tok::render_chat_template(tmpl, head, true, extra);
      cur = tok::render_chat_template(tmpl, upto, false, extra);
    } catch (const Error& e) {
      throw DataError(at + ": chat template (message " + std::to_string(i) + "): " + e.what());
    }
    if (!starts_with(full, pre))
      throw DataError(at + ": cannot locate assistant message " + std::to_string(i) +
                      " (the template's generation prompt is not a prefix of the conversation)");
    size_t end_char;
    if (starts_with(full, cur) && cur.size() > pre.size()) {
      end_char = cur.size();
    } else {
      // The template renders a final assistant turn differently (e.g. Qwen3's empty think block): find the
      // content after the prompt and extend by the end-of-turn text that follows it in `cur`.
      if (!messages[i].contains("content") || !messages[i]["content"].is_string())
        throw DataError(at + ": cannot locate assistant message " + std::to_string(i) +
                        " in the rendered conversation (its content is not a string)");
      std::string content = messages[i]["content"].get<std::string>();
      size_t pos = content.empty() ? pre.size() : full.find(content, pre.size());
      if (pos == std::string::npos) throw DataError(at + ": cannot locate assistant message " + std::to_string(i));
      end_char = pos + content.size();
      size_t cpos = content.empty() ? std::string::npos : cur.find(content, pre.size());
      if (cpos != std::string::npos) {
        std::string tail = cur.substr(cpos + content.size());
        if (starts_with(full.substr(end_char), tail)) end_char += tail.size();
      }
    }
    size_t t0 = token_prefix_len(tt.tok, pre, s.input_ids);
    size_t t1 = end_char >= full.size() ? s.input_ids.size() : token_prefix_len(tt.tok, full.substr(0, end_char), s.input_ids);
    for (size_t t = t0; t < t1 && t < s.labels.size(); ++t) s.labels[t] = s.input_ids[t];
  }
  return s;
}

void append_eos_if_missing(const TextTokenizer& tt, Sample& s) {
  auto eos = tt.tok.eos_id();
  if (eos && (s.input_ids.empty() || s.input_ids.back() != *eos)) {
    s.input_ids.push_back(*eos);
    s.labels.push_back(*eos);
  }
}

Sample encode_prompt_completion(const TextTokenizer& tt, const std::string& prompt, const std::string& answer,
                                bool answer_only) {
  Sample s;
  s.input_ids = tt.tok.encode(prompt + answer, true);
  // The prompt's tokens are the common prefix of encode(prompt) and encode(prompt + answer): a prompt that
  // ends in a space ("Answer: ") tokenizes that space on its own but merges it into the answer's first
  // word in the full text, and that first answer token must keep its label.
  size_t np = 0;
  if (answer_only) {
    auto p = tt.tok.encode(prompt, true);
    while (np < p.size() && np < s.input_ids.size() && p[np] == s.input_ids[np]) ++np;
  }
  s.labels.resize(s.input_ids.size());
  for (size_t t = 0; t < s.input_ids.size(); ++t) s.labels[t] = t < np ? -100 : s.input_ids[t];
  append_eos_if_missing(tt, s);
  return s;
}

std::vector<std::pair<std::string, nlohmann::ordered_json>> read_json_rows(const std::string& path, int64_t limit) {
  std::ifstream f(path);
  if (!f) throw IoError("dataset file not found or unreadable: " + path);
  std::vector<std::pair<std::string, nlohmann::ordered_json>> rows;
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  size_t first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && text[first] == '[') {
    nlohmann::ordered_json j;
    try {
      j = nlohmann::ordered_json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
      throw DataError(path + ": malformed JSON (" + std::string(e.what()).substr(0, 160) + ")");
    }
    for (size_t i = 0; i < j.size(); ++i) {
      if (limit > 0 && static_cast<int64_t>(rows.size()) >= limit) break;
      rows.emplace_back(path + "[" + std::to_string(i) + "]", j[i]);
    }
    return rows;
  }
  std::istringstream in(text);
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (limit > 0 && static_cast<int64_t>(rows.size()) >= limit) break;
    const std::string at = path + ":" + std::to_string(lineno);
    try {
      rows.emplace_back(at, nlohmann::ordered_json::parse(line));
    } catch (const nlohmann::json::parse_error& e) {
      throw DataError(at + ": malformed JSON line (" + std::string(e.what()).substr(0, 160) + ")");
    }
  }
  return rows;
}

std::unique_ptr<Dataset> finish_text_dataset(const std::string& name, std::vector<Sample> samples,
                                             const TextDatasetOptions& o) {
  std::vector<Sample> out;
  out.reserve(samples.size());
  int64_t truncated = 0, dropped = 0;
  for (auto& s : samples) {
    if (o.seq_length > 0 && static_cast<int64_t>(s.input_ids.size()) > o.seq_length) {
      if (o.drop_long) {
        ++dropped;
        continue;
      }
      s.input_ids.resize(static_cast<size_t>(o.seq_length));
      s.labels.resize(static_cast<size_t>(o.seq_length));
      ++truncated;
    }
    for (int32_t id : s.input_ids)
      if (id < 0 || (o.vocab_size > 0 && id >= o.vocab_size))
        throw DataError(name + ": token id " + std::to_string(id) + " is out of range for vocab_size " +
                        std::to_string(o.vocab_size) + " (tokenizer does not match the model?)");
    out.push_back(std::move(s));
  }
  if (truncated > 0)
    log::info(name + ": truncated " + std::to_string(truncated) + " samples to seq_length " + std::to_string(o.seq_length));
  if (dropped > 0)
    log::info(name + ": dropped " + std::to_string(dropped) + " samples longer than seq_length " + std::to_string(o.seq_length));
  if (out.empty()) throw DataError(name + ": the dataset has no samples");
  return std::make_unique<VectorDataset>(name, std::move(out));
}

}  // namespace am
