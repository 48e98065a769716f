// Shared pieces of the text datasets (chat, squad, column_mapped): tokenizer + chat template loading,
// chat rendering with assistant-only labels, prompt/completion encoding, length limits, packing.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/dataset.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace am {

// Options every text dataset reads from its recipe section.
struct TextDatasetOptions {
  std::string path;            // resolved data file
  std::string tokenizer_dir;   // ctx.tokenizer_dir or the section's `tokenizer`
  int64_t limit = 0;           // limit_dataset_samples (0 = all)
  int64_t seq_length = 0;      // 0 = no limit
  bool drop_long = false;      // drop (true) or truncate (false) samples longer than seq_length
  int64_t vocab_size = 0;
  std::string chat_template;   // `chat_template` override: a .jinja file path or the template text ("" = the folder's)
};

struct TextTokenizer {
  tok::Tokenizer tok;
  std::optional<tok::ChatTemplate> tmpl;
  static TextTokenizer load(const std::string& dir, const std::string& chat_template_override = "");
  static TextTokenizer load(const TextDatasetOptions& o) { return load(o.tokenizer_dir, o.chat_template); }
};

// A dataset holding its samples in memory.
class VectorDataset : public Dataset {
 public:
  VectorDataset(std::string name, std::vector<Sample> s) : name_(std::move(name)), samples_(std::move(s)) {}
  size_t size() const override { return samples_.size(); }
  const Sample& get(size_t i) const override { return samples_.at(i); }
  std::string name() const override { return name_; }

 private:
  std::string name_;
  std::vector<Sample> samples_;
};

// Renders `messages` with the template and tokenizes without special tokens; labels = token ids of every
// assistant turn (its content and the end-of-turn text the template emits after it), -100 elsewhere.
// `all_labels`: every token is a label. Throws DataError (prefixed by `at`) when spans cannot be found.
Sample encode_chat(const TextTokenizer& tt, const nlohmann::ordered_json& messages, const nlohmann::ordered_json& extra,
                   const std::string& at, bool all_labels = false);
// AutoModel's format_prompt_completion: encode(prompt + answer) with special tokens, eos appended when
// missing; labels on the tokens after the common prefix of encode(prompt) and encode(prompt + answer)
// (all tokens when !answer_only).
Sample encode_prompt_completion(const TextTokenizer& tt, const std::string& prompt, const std::string& answer,
                                bool answer_only);
// Appends eos (as a label) when the sample does not end with it (AutoModel's format_chat_template).
void append_eos_if_missing(const TextTokenizer& tt, Sample& s);

// Reads a JSON list or JSONL file into (origin "file:line" or "file[i]", object) rows. Honors `limit`.
std::vector<std::pair<std::string, nlohmann::ordered_json>> read_json_rows(const std::string& path, int64_t limit);

// Applies seq_length (truncate or drop, reported with log::info) and validates token ids; returns the
// dataset (DataError when empty).
std::unique_ptr<Dataset> finish_text_dataset(const std::string& name, std::vector<Sample> samples,
                                             const TextDatasetOptions& o);

}  // namespace am
