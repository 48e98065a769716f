// Maps a recipe's dataset `_target_` (short name or NeMo AutoModel's dotted name) to a dataset.
#include "core/error.h"
#include "data/datasets_impl.h"
#include "train/recipe.h"

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
  int64_t limit = r.get_int(sec + ".limit_dataset_samples", 0);
  if (kind == "tokenized_jsonl") {
    std::string path = r.get_string(sec + ".path_or_dataset", "");
    if (path.empty()) r.fail(sec + ".path_or_dataset", "tokenized_jsonl needs a file path");
    return make_tokenized_jsonl(r.resolve_path(path), ctx, limit);
  }
  if (kind == "mock") {
    int64_t seq = r.get_int(sec + ".seq_len", r.get_int(sec + ".seq_length", ctx.default_seq_len));
    int64_t n = r.get_int(sec + ".num_samples", limit > 0 ? limit : 1024);
    int64_t vocab = r.get_int(sec + ".vocab_size", ctx.vocab_size);
    if (vocab > ctx.vocab_size) r.fail(sec + ".vocab_size", "larger than the model's vocab_size " + std::to_string(ctx.vocab_size));
    return make_mock(seq, n, vocab, ctx.seed + (sec == "dataset" ? 0 : 1));
  }
  if (kind.empty()) r.fail(sec + "._target_", "unknown dataset '" + target + "' (supported: tokenized_jsonl, mock)");
  r.fail(sec + "._target_", "dataset '" + kind + "' needs the tokenizer, which is not built yet (supported now: tokenized_jsonl, mock)");
}

}  // namespace am
