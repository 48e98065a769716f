// `hellaswag`: HellaSwag as single-turn SFT, as NeMo AutoModel's HellaSwag dataset
// (nemo_automodel/components/datasets/llm/hellaswag.py + SFTSingleTurnPreprocessor in datasets/utils.py):
// context = `ctx`, target = endings[label]; both are tokenized separately with the tokenizer's special
// tokens, a trailing special token is dropped from the context and a leading one from the target, the
// sample is context ids + target ids, and the loss is on the target ids only (no chat template, no eos
// beyond what the tokenizer itself adds at the end of the target).
//
// Input: rows of the official HellaSwag JSONL ({ctx | ctx_a + ctx_b, endings, label, ...}, also a JSON list,
// label an int or a digit string) or of the hub's parquet / Arrow (rowan/hellaswag: the same columns, label a
// string, endings a list), from any source data/source.h resolves; or a local 6-lines-per-task text file
// ("activity_label: ctx", label, 4 endings) as in /work/shared/datasets/hellaswag. Text files may be
// bzip2-compressed. All are streamed.
#include "core/error.h"
#include "data/source.h"
#include "data/datasets_impl.h"
#include "data/text_common.h"

namespace am {

namespace {
struct Task {
  std::string at, ctx, ending;
};

bool is_special(const tok::Tokenizer& t, int32_t id) {
  // transformers' all_special_ids: bos/eos/unk/pad (+ the added tokens marked special).
  for (auto s : {t.bos_id(), t.eos_id(), t.unk_id(), t.pad_id()})
    if (s && *s == id) return true;
  return t.is_special_id(id);
}

Sample encode_task(const tok::Tokenizer& t, const Task& task) {
  auto ctx = t.encode(task.ctx, true);
  auto tgt = t.encode(task.ending, true);
  if (!ctx.empty() && is_special(t, ctx.back())) ctx.pop_back();
  if (!tgt.empty() && is_special(t, tgt.front())) tgt.erase(tgt.begin());
  if (tgt.empty()) throw DataError(task.at + ": the correct ending tokenizes to nothing");
  Sample s;
  s.input_ids = ctx;
  s.input_ids.insert(s.input_ids.end(), tgt.begin(), tgt.end());
  s.labels.assign(ctx.size(), -100);
  s.labels.insert(s.labels.end(), tgt.begin(), tgt.end());
  return s;
}

int64_t parse_label(const std::string& s) {
  if (s.empty() || s.size() > 3 || s.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoll(s);
}

// One row of the official JSONL.
Task task_of_row(const JsonRow& r) {
  const auto& j = r.value;
  const std::string& at = r.at;
  if (!j.is_object()) throw DataError(at + ": expected a HellaSwag object {ctx, endings, label}");
  auto str = [&](const char* k) -> std::optional<std::string> {
    if (!j.contains(k) || j[k].is_null()) return std::nullopt;
    if (!j[k].is_string()) throw DataError(at + ": \"" + k + "\" must be a string");
    return j[k].get<std::string>();
  };
  Task t;
  t.at = at;
  if (auto c = str("ctx")) {
    t.ctx = *c;
  } else if (auto a = str("ctx_a")) {
    auto b = str("ctx_b");
    t.ctx = (b && !b->empty()) ? *a + " " + *b : *a;  // how the official data builds ctx
  } else {
    throw DataError(at + ": missing \"ctx\" (or \"ctx_a\"/\"ctx_b\")");
  }
  if (!j.contains("endings") || !j["endings"].is_array() || j["endings"].empty())
    throw DataError(at + ": \"endings\" must be a non-empty list of strings");
  const auto& e = j["endings"];
  if (!j.contains("label") || j["label"].is_null() || (j["label"].is_string() && j["label"].get<std::string>().empty()))
    throw DataError(at + ": no \"label\" (the HellaSwag test split is unlabeled; use train or validation)");
  const auto& l = j["label"];
  int64_t label = l.is_number_integer() ? l.get<int64_t>() : l.is_string() ? parse_label(l.get<std::string>()) : -1;
  if (label < 0 || label >= static_cast<int64_t>(e.size()))
    throw DataError(at + ": \"label\" must be an index into \"endings\" (0-" + std::to_string(e.size() - 1) +
                    "), got " + l.dump());
  if (!e[label].is_string()) throw DataError(at + ": endings[" + std::to_string(label) + "] must be a string");
  t.ending = e[label].get<std::string>();
  return t;
}

// The text layout, 6 lines per task: "activity_label: ctx", the label, the 4 endings. Each task becomes the
// row the JSON layouts have, {"ctx", "endings", "label"}, at "file:line". The activity label is dropped
// (AutoModel's prompt is `ctx` alone).
class TextTaskReader {
 public:
  explicit TextTaskReader(const std::string& path) : f_(path) {}
  // false at the end of the file
  bool next(JsonRow& row) {
    std::string lines[6];
    int64_t first = 0;
    for (int k = 0; k < 6; ++k) {
      if (!f_.getline(lines[k])) {
        if (k == 0) return false;
        throw DataError(f_.path() + ":" + std::to_string(first) + ": incomplete task at the end of the file (" +
                        std::to_string(k) + " of 6 lines: \"activity_label: ctx\", label, 4 endings)");
      }
      ++lineno_;
      if (k == 0 && lines[0].find_first_not_of(" \t\r\f\v") == std::string::npos) {  // blank lines between tasks
        --k;
        continue;
      }
      if (k == 0) first = lineno_;
    }
    row.at = f_.path() + ":" + std::to_string(first);
    const std::string& head = lines[0];
    if (!head.empty() && head[0] == '{')
      throw DataError(row.at + ": a JSON line inside a 6-lines-per-task HellaSwag text file");
    size_t colon = head.find(": ");
    int64_t label = parse_label(lines[1]);
    if (label < 0 || label > 3)
      throw DataError(f_.path() + ":" + std::to_string(first + 1) + ": expected the label (0-3), got \"" +
                      lines[1].substr(0, 80) + "\" (6 lines per task: \"activity_label: ctx\", label, 4 endings)");
    row.value = nlohmann::ordered_json::object();
    row.value["ctx"] = colon == std::string::npos ? head : head.substr(colon + 2);
    row.value["endings"] = nlohmann::ordered_json::array({lines[2], lines[3], lines[4], lines[5]});
    row.value["label"] = label;
    return true;
  }

 private:
  InputFile f_;
  int64_t lineno_ = 0;
};

class TextTaskFile : public RowFile {
 public:
  explicit TextTaskFile(std::string path) : path_(std::move(path)) {}
  int64_t num_rows() override {
    if (count_ < 0) count_ = read(0, -1, [](JsonRow&&) { return true; });
    return count_;
  }
  int64_t read(int64_t begin, int64_t end, const std::function<bool(JsonRow&&)>& fn) override {
    TextTaskReader r(path_);
    JsonRow row;
    for (int64_t i = 0;; ++i) {
      if (end >= 0 && i >= end) return -1;
      if (!r.next(row)) return count_ = i;
      if (i >= begin && !fn(std::move(row))) return -1;
    }
  }

 private:
  std::string path_;
  int64_t count_ = -1;
};

// A local text file that is not JSON is the text layout; everything else is read as rows.
std::unique_ptr<RowFile> open_hellaswag_file(const DataFile& f) {
  if (f.format != DataFormat::Json && f.format != DataFormat::Text) return nullptr;
  const std::string first = first_nonblank_line(f.path);
  const size_t k = first.find_first_not_of(" \t\r\f\v\xEF\xBB\xBF");
  if (k == std::string::npos || first[k] == '{' || first[k] == '[') return nullptr;
  return std::make_unique<TextTaskFile>(f.path);
}
}  // namespace

std::unique_ptr<Dataset> make_hellaswag(const TextDatasetOptions& o) {
  if (o.tokenizer_dir.empty()) throw IoError("hellaswag needs a tokenizer folder (model path, model.tokenizer or dataset.tokenizer)");
  auto samples = tokenise_cached(o, "hellaswag", "", false, [&] {
    // No chat template: plain text, as AutoModel.
    const auto tt = TextTokenizer::shared(o.tokenizer_dir, "", false);
    // Rows (JSON lines, parquet, Arrow, or tasks of the text layout) are streamed in chunks, each chunk
    // tokenized on every core.
    return map_json_rows(o, [&](const JsonRow& r) { return encode_task(tt->tok, task_of_row(r)); }, open_hellaswag_file);
  });
  return finish_text_dataset("hellaswag(" + o.path + ")", std::move(samples), o);
}

}  // namespace am
