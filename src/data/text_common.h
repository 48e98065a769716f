// Shared pieces of the text datasets (chat, squad, column_mapped, hellaswag): tokenizer + chat template
// loading, streaming line/row readers, the thread pool that formats and tokenizes samples, chat rendering
// with assistant-only labels, prompt/completion encoding, length limits.
#pragma once
#include <cstdio>
#include <functional>
#include <istream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/dataset.h"
#include "data/length_limit.h"
#include "data/source.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace am {

// Options every text dataset reads from its recipe section.
struct TextDatasetOptions {
  std::string path;            // the data as named in messages and dataset names (a file path, or an id)
  DataSource source;           // where the rows are (data/source.h); none resolved: `path` as one local file
  std::string split = "train";            // split expression (data/source.h: parse_split)
  std::string split_key = "dataset.split";  // the recipe key it came from, for messages
  std::string tokenizer_dir;   // ctx.tokenizer_dir or the section's `tokenizer`
  int64_t limit = 0;           // limit_dataset_samples (0 = all)
  LengthLimit length;          // seq_length / max_length, drop_long_samples, truncation (data/length_limit.h)
  int64_t vocab_size = 0;
  std::string chat_template;   // `chat_template` override: a .jinja file path or the template text ("" = the folder's)
  int num_threads = 0;         // formatting/tokenization threads (0 = $AM_DATA_THREADS, else every core)
  bool cache = true;           // the on-disk tokenised-dataset cache (data/token_cache.h); off: `cache: false`
                               // in the section or AM_DATASET_CACHE=0
};

struct TextTokenizer {
  tok::Tokenizer tok;
  std::optional<tok::ChatTemplate> tmpl;
  static TextTokenizer load(const std::string& dir, const std::string& chat_template_override = "");
  static TextTokenizer load(const TextDatasetOptions& o) { return load(o.tokenizer_dir, o.chat_template); }
  // The same, loaded once per process: the training and the validation set (and the datasets of one test)
  // share it. Remembered by folder, override and the size + mtime of the files read (the last two loaded are
  // kept). with_template = false: no chat template is looked for (hellaswag).
  static std::shared_ptr<const TextTokenizer> shared(const std::string& dir, const std::string& chat_template_override = "",
                                                     bool with_template = true);
  static std::shared_ptr<const TextTokenizer> shared(const TextDatasetOptions& o) { return shared(o.tokenizer_dir, o.chat_template); }
};

// A dataset holding its samples in memory.
class VectorDataset : public Dataset {
 public:
  VectorDataset(std::string name, std::vector<Sample> s) : name_(std::move(name)), samples_(std::move(s)) {}
  size_t size() const override { return samples_.size(); }
  Sample get(size_t i) const override { return samples_.at(i); }
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

// A text file read as a stream, never whole: plain, or bzip2-compressed (".bz2" name or "BZh" magic),
// decompressed on the fly by the `bzip2` program. Missing or unreadable file -> IoError.
class InputFile {
 public:
  explicit InputFile(const std::string& path);
  ~InputFile();
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
  std::istream& stream() { return *in_; }
  // Next line without its '\n' (and a trailing '\r'); false at the end. At the end of a compressed file
  // the decompressor's exit status is checked (IoError on a corrupt file).
  bool getline(std::string& line);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* pipe_ = nullptr;
  std::unique_ptr<std::streambuf> buf_;
  std::unique_ptr<std::istream> in_;
  void close_pipe(bool check);
};

// The first line of `path` that is not blank ("" when none).
std::string first_nonblank_line(const std::string& path);
// Parses the whole file as one JSON document, read from the stream; std::nullopt when it is not valid JSON.
std::optional<nlohmann::ordered_json> parse_json_file(const std::string& path);

// Streams the rows of a JSONL file line by line (blank lines skipped, a malformed line is a DataError
// naming file:line), or of a file holding one JSON list (parsed from the stream). Honors `limit` (0 = all).
class JsonRowReader {
 public:
  JsonRowReader(const std::string& path, int64_t limit);
  bool next(JsonRow& row);
  // Steps over the next row without parsing it (a JSON line is not checked); false at the end or the limit.
  bool skip();

 private:
  std::string path_;
  int64_t limit_ = 0, count_ = 0, lineno_ = 0;
  std::unique_ptr<InputFile> file_;
  bool list_ = false;
  nlohmann::ordered_json list_json_;
  size_t list_i_ = 0;
};

// Number of worker threads for `requested` (0 = $AM_DATA_THREADS when it is a positive number, else
// std::thread::hardware_concurrency()).
int resolve_threads(int requested);
// fn(0) ... fn(n-1) on up to `threads` threads; results in index order, identical to the sequential loop.
// When calls throw, the exception of the lowest index is rethrown (the one a sequential loop would meet).
// fn must be safe to call concurrently (Tokenizer::encode and chat-template rendering are).
std::vector<Sample> parallel_samples(size_t n, int threads, const std::function<Sample(size_t)>& fn);
// Streams the rows of `path` (JsonRowReader) in bounded chunks and converts each with fn on `threads`
// threads: only a chunk of raw rows is held at a time; output order and the error reported are those of a
// sequential pass over the file.
std::vector<Sample> map_json_rows(const std::string& path, int64_t limit, int threads,
                                  const std::function<Sample(const JsonRow&)>& fn);
// The same over the rows of o.source (or the local file o.path when none is resolved) for o.split and
// o.limit (data/source.h: for_each_row), read with `opener` where it handles a file.
std::vector<Sample> map_json_rows(const TextDatasetOptions& o, const std::function<Sample(const JsonRow&)>& fn,
                                  const RowFileOpener& opener = {});

// The samples of a text dataset before its length limit: read from the tokenised-dataset cache
// (data/token_cache.h) when it holds them for this dataset, else made by `build` (which loads the tokenizer
// and maps the rows) and written to it. `kind` and `params` (the kind's own formatting keys) are part of the
// key; uses_chat_template = false leaves the folder's template files out of it. Logs one line: the cache
// hit, or the samples built, the time, the threads and where they were cached. o.cache = false: build only.
std::vector<Sample> tokenise_cached(const TextDatasetOptions& o, const std::string& kind, const std::string& params,
                                    bool uses_chat_template, const std::function<std::vector<Sample>()>& build);

// Applies the length limit (apply_length_limit: truncate or drop, reported) and validates token ids;
// returns the dataset (DataError when empty).
std::unique_ptr<Dataset> finish_text_dataset(const std::string& name, std::vector<Sample> samples,
                                             const TextDatasetOptions& o);

}  // namespace am
