// Maps a recipe's dataset `_target_` (short name or NeMo AutoModel's dotted name) to a dataset.
#include "core/error.h"
#include "data/datasets_impl.h"
#include "data/length_limit.h"
#include "data/text_common.h"
#include "config/recipe.h"

namespace am {

static std::string short_target(const std::string& t) {
  if (t == "tokenized_jsonl" || t == "mock" || t == "squad" || t == "column_mapped" || t == "chat" || t == "hellaswag")
    return t;
  if (t.find("make_squad_dataset") != std::string::npos || t.find(".squad.") != std::string::npos) return "squad";
  if (t.find("ColumnMappedTextInstructionDataset") != std::string::npos || t.find("column_mapped") != std::string::npos)
    return "column_mapped";
  if (t.find("ChatDataset") != std::string::npos || t.find(".chat_dataset") != std::string::npos) return "chat";
  if (t.find("HellaSwag") != std::string::npos || t.find("hellaswag") != std::string::npos) return "hellaswag";
  if (t.find("MockIterableDataset") != std::string::npos || t.find("mock") != std::string::npos) return "mock";
  if (t.find("tokenized_jsonl") != std::string::npos) return "tokenized_jsonl";
  return "";
}

std::unique_ptr<Dataset> make_dataset(const Recipe& r, const std::string& sec, const DatasetContext& ctx) {
  std::string target = r.get_string(sec + "._target_", "");
  if (target.empty()) r.fail(sec + "._target_", "missing dataset _target_ (e.g. tokenized_jsonl, mock, squad)");
  std::string kind = short_target(target);
  if (kind.empty())
    r.fail(sec + "._target_", "unknown dataset '" + target + "' (supported: tokenized_jsonl, mock, chat, squad, column_mapped, hellaswag)");
  // limit_dataset_samples (squad, column_mapped, chat) or num_samples_limit (AutoModel's HellaSwag); 0 = all.
  const auto lim_a = read_sample_count(r, sec + ".limit_dataset_samples", true);
  const auto lim_b = read_sample_count(r, sec + ".num_samples_limit", true);
  const int64_t limit = lim_a ? *lim_a : lim_b ? *lim_b : 0;
  // seq_length / max_length, drop_long_samples, truncation: the same for every kind (data/length_limit.h).
  const LengthLimit length = read_length_limit(r, sec);
  if (kind == "tokenized_jsonl") {
    std::string path = r.get_string(sec + ".path_or_dataset", "");
    if (path.empty()) r.fail(sec + ".path_or_dataset", "tokenized_jsonl needs a file path");
    return make_tokenized_jsonl(r.resolve_path(path), ctx, limit, length);
  }
  if (kind == "mock") {
    // seq_len (else seq_length) is the length generated; a seq_length / max_length below it is a limit.
    const std::string seq_key = r.has(sec + ".seq_len") ? sec + ".seq_len" : sec + ".seq_length";
    const int64_t seq = r.get_int(seq_key, ctx.default_seq_len);
    if (r.has(seq_key) && seq < 2) r.fail(seq_key, "must be >= 2 tokens, got " + std::to_string(seq));
    const auto n_opt = read_sample_count(r, sec + ".num_samples", false);
    const int64_t n = n_opt ? *n_opt : limit > 0 ? limit : 1024;
    int64_t vocab = r.get_int(sec + ".vocab_size", ctx.vocab_size);
    if (vocab > ctx.vocab_size) r.fail(sec + ".vocab_size", "larger than the model's vocab_size " + std::to_string(ctx.vocab_size));
    if (vocab < 1) r.fail(sec + ".vocab_size", "must be >= 1, got " + std::to_string(vocab));
    if (length.drop_long && length.max_len > 0 && seq > length.max_len)
      r.fail(length.key, "every mock sample (" + std::to_string(seq) + " tokens) is longer than " +
                             std::to_string(length.max_len) + " and drop_long_samples is true: nothing would be left");
    return make_mock(seq, n, vocab, ctx.seed + (sec == "dataset" ? 0 : 1), length);
  }
  if (kind == "chat" || kind == "squad" || kind == "column_mapped" || kind == "hellaswag") {
    TextDatasetOptions o;
    std::string path = r.get_string(sec + ".path_or_dataset", "");
    if (path.empty())
      r.fail(sec + ".path_or_dataset", kind + (kind == "hellaswag" ? " needs a local HellaSwag JSONL or text file path"
                                                                   : " needs a local JSON/JSONL file path"));
    o.path = r.resolve_path(path);
    o.tokenizer_dir = r.has(sec + ".tokenizer") ? r.resolve_path(r.get_string(sec + ".tokenizer", "")) : ctx.tokenizer_dir;
    if (o.tokenizer_dir.empty())
      r.fail(sec + "._target_", "dataset '" + kind + "' needs a tokenizer (model.tokenizer or " + sec + ".tokenizer)");
    o.limit = limit;
    o.length = length;
    o.vocab_size = ctx.vocab_size;
    o.num_threads = ctx.num_threads;
    if (r.has(sec + ".chat_template")) {
      std::string ct = r.get_string(sec + ".chat_template", "");
      o.chat_template = (ct.find("{%") == std::string::npos && ct.find("{{") == std::string::npos) ? r.resolve_path(ct) : ct;
    }
    if (kind == "chat") return make_chat(o);
    if (kind == "squad") return make_squad(o);
    if (kind == "hellaswag") return make_hellaswag(o);
    std::map<std::string, std::string> mapping;
    if (!r.has(sec + ".column_mapping") || !r.node(sec + ".column_mapping").is_object())
      r.fail(sec + ".column_mapping", "column_mapped needs column_mapping: {context, question, answer}");
    for (auto& [k, v] : r.node(sec + ".column_mapping").items()) {
      if (k != "context" && k != "question" && k != "answer")
        r.fail(sec + ".column_mapping." + k, "unknown column '" + k + "' (context, question, answer)");
      if (!v.is_string()) r.fail(sec + ".column_mapping." + k, "expected a column name");
      mapping[k] = v.get<std::string>();
    }
    if (!mapping.count("answer")) r.fail(sec + ".column_mapping", "column_mapping needs an 'answer' column");
    return make_column_mapped(o, mapping, r.get_bool(sec + ".answer_only_loss_mask", true));
  }
  r.fail(sec + "._target_", "dataset '" + kind + "' is not implemented");
}

}  // namespace am
