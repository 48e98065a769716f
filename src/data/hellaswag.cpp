// `hellaswag`: HellaSwag as single-turn SFT, as NeMo AutoModel's HellaSwag dataset
// (nemo_automodel/components/datasets/llm/hellaswag.py + SFTSingleTurnPreprocessor in datasets/utils.py):
// context = `ctx`, target = endings[label]; both are tokenized separately with the tokenizer's special
// tokens, a trailing special token is dropped from the context and a leading one from the target, the
// sample is context ids + target ids, and the loss is on the target ids only (no chat template, no eos
// beyond what the tokenizer itself adds at the end of the target).
//
// Input: the official HellaSwag JSONL ({ctx | ctx_a + ctx_b, endings, label, ...}, also a JSON list, label
// an int or a digit string), or the 6-lines-per-task text layout ("activity_label: ctx", label, 4 endings)
// of /work/shared/datasets/hellaswag; either may be bzip2-compressed. Both are streamed.
#include "core/error.h"
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

// The text layout, 6 lines per task: "activity_label: ctx", the label, the 4 endings. The activity label
// is dropped (AutoModel's prompt is `ctx` alone). next() is false at the end of the file or the limit.
class TextTaskReader {
 public:
  TextTaskReader(const std::string& path, int64_t limit) : f_(path), limit_(limit) {}
  bool next(Task& t) {
    if (limit_ > 0 && count_ >= limit_) return false;
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
    t.at = f_.path() + ":" + std::to_string(first);
    const std::string& head = lines[0];
    if (!head.empty() && head[0] == '{')
      throw DataError(t.at + ": a JSON line inside a 6-lines-per-task HellaSwag text file");
    size_t colon = head.find(": ");
    t.ctx = colon == std::string::npos ? head : head.substr(colon + 2);
    int64_t label = parse_label(lines[1]);
    if (label < 0 || label > 3)
      throw DataError(f_.path() + ":" + std::to_string(first + 1) + ": expected the label (0-3), got \"" +
                      lines[1].substr(0, 80) + "\" (6 lines per task: \"activity_label: ctx\", label, 4 endings)");
    t.ending = lines[2 + label];
    ++count_;
    return true;
  }

 private:
  InputFile f_;
  int64_t limit_, count_ = 0, lineno_ = 0;
};
}  // namespace

std::unique_ptr<Dataset> make_hellaswag(const TextDatasetOptions& o) {
  if (o.tokenizer_dir.empty()) throw IoError("hellaswag needs a tokenizer folder (model path, model.tokenizer or dataset.tokenizer)");
  const tok::Tokenizer t = tok::Tokenizer::from_dir(o.tokenizer_dir);  // no chat template: plain text, as AutoModel
  std::vector<Sample> samples;
  const std::string first = first_nonblank_line(o.path);
  size_t k = first.find_first_not_of(" \t\r\f\v\xEF\xBB\xBF");
  if (k != std::string::npos && (first[k] == '{' || first[k] == '[')) {
    samples = map_json_rows(o.path, o.limit, o.num_threads,
                            [&](const JsonRow& r) { return encode_task(t, task_of_row(r)); });
  } else {
    // Text layout: streamed in chunks of tasks, each chunk tokenized on every core.
    TextTaskReader reader(o.path, o.limit);
    const size_t chunk = std::max<size_t>(1024, 256 * static_cast<size_t>(resolve_threads(o.num_threads)));
    std::vector<Task> tasks;
    while (true) {
      tasks.clear();
      std::exception_ptr read_err;
      try {
        Task task;
        while (tasks.size() < chunk && reader.next(task)) tasks.push_back(std::move(task));
      } catch (...) {
        read_err = std::current_exception();
      }
      auto part = parallel_samples(tasks.size(), o.num_threads, [&](size_t i) { return encode_task(t, tasks[i]); });
      if (read_err) std::rethrow_exception(read_err);
      samples.insert(samples.end(), std::make_move_iterator(part.begin()), std::make_move_iterator(part.end()));
      if (tasks.size() < chunk) break;
    }
  }
  return finish_text_dataset("hellaswag(" + o.path + ")", std::move(samples), o);
}

}  // namespace am
