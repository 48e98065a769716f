#include "data/text_common.h"

#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "data/token_cache.h"
#include "io/json_bounded.h"

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

namespace {
// size:mtime of the files a TextTokenizer is read from ("-" for a missing one).
std::string stat_fingerprint(const std::string& dir, const std::string& override_path) {
  namespace fs = std::filesystem;
  std::string fp;
  auto one = [&](const fs::path& p) {
    std::error_code ec;
    const auto size = fs::file_size(p, ec);
    if (ec) {
      fp += "-;";
      return;
    }
    const auto t = fs::last_write_time(p, ec);
    fp += std::to_string(size) + ":" + std::to_string(ec ? 0 : t.time_since_epoch().count()) + ";";
  };
  const fs::path d(dir);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                        "chat_template.json"})
    one(d / f);
  std::error_code ec;
  if (fs::is_directory(d / "additional_chat_templates", ec))
    for (const auto& e : fs::directory_iterator(d / "additional_chat_templates", ec)) {
      fp += e.path().filename().string() + "=";
      one(e.path());
    }
  if (!override_path.empty()) one(override_path);
  return fp;
}
}  // namespace

std::shared_ptr<const TextTokenizer> TextTokenizer::shared(const std::string& dir, const std::string& chat_template_override,
                                                           bool with_template) {
  if (dir.empty()) throw IoError("text datasets need a tokenizer folder (model path, model.tokenizer or dataset.tokenizer)");
  const bool override_is_text =
      chat_template_override.find("{%") != std::string::npos || chat_template_override.find("{{") != std::string::npos;
  const std::string key = dir + '\n' + (with_template ? "T" : "-") + '\n' + chat_template_override + '\n' +
                          stat_fingerprint(dir, override_is_text ? "" : chat_template_override);
  static std::mutex mu;
  static std::vector<std::pair<std::string, std::shared_ptr<const TextTokenizer>>> memo;  // most recent first
  std::lock_guard<std::mutex> lk(mu);
  for (size_t i = 0; i < memo.size(); ++i)
    if (memo[i].first == key) {
      auto hit = memo[i].second;
      memo.erase(memo.begin() + static_cast<std::ptrdiff_t>(i));
      memo.insert(memo.begin(), {key, hit});
      return hit;
    }
  std::shared_ptr<const TextTokenizer> t;
  if (with_template) {
    t = std::make_shared<const TextTokenizer>(load(dir, chat_template_override));
  } else {
    TextTokenizer plain;
    plain.tok = tok::Tokenizer::from_dir(dir);
    t = std::make_shared<const TextTokenizer>(std::move(plain));
  }
  memo.insert(memo.begin(), {key, t});
  if (memo.size() > 2) memo.pop_back();
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
    nlohmann::ordered_json head = nlohmann::ordered_json::array();
    for (size_t k = 0; k < i; ++k) head.push_back(messages[k]);
    std::string pre, cur;
    try {
      pre = tok::render_chat_template(tmpl, head, true, extra);
      if (i + 1 == messages.size()) {
        cur = full;  // messages[0..i] is the whole conversation: the same render as `full`
      } else {
        nlohmann::ordered_json upto = head;
        upto.push_back(messages[i]);
        cur = tok::render_chat_template(tmpl, upto, false, extra);
      }
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

namespace {
// A read-only streambuf over a FILE* (the decompressor's pipe).
class FileStreamBuf : public std::streambuf {
 public:
  explicit FileStreamBuf(std::FILE* f) : f_(f) {}

 protected:
  int_type underflow() override {
    if (gptr() < egptr()) return traits_type::to_int_type(*gptr());
    size_t n = std::fread(buf_, 1, sizeof buf_, f_);
    if (n == 0) return traits_type::eof();
    setg(buf_, buf_, buf_ + n);
    return traits_type::to_int_type(*gptr());
  }

 private:
  std::FILE* f_;
  char buf_[1 << 16];
};

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}
}  // namespace

InputFile::InputFile(const std::string& path) : path_(path) {
  auto f = std::make_unique<std::ifstream>(path, std::ios::binary);
  if (!*f || std::filesystem::is_directory(path)) throw IoError("dataset file not found or unreadable: " + path);
  char magic[3] = {0, 0, 0};
  f->read(magic, 3);
  const bool bz2 = (f->gcount() == 3 && magic[0] == 'B' && magic[1] == 'Z' && magic[2] == 'h') ||
                   (path.size() > 4 && path.compare(path.size() - 4, 4, ".bz2") == 0);
  if (!bz2) {
    f->clear();
    f->seekg(0);
    in_ = std::move(f);
    return;
  }
  f.reset();
  std::fflush(nullptr);
  pipe_ = ::popen(("bzip2 -dc < " + shell_quote(path) + " 2>/dev/null").c_str(), "r");
  if (!pipe_) throw IoError(path + ": cannot start bzip2 to decompress it");
  buf_ = std::make_unique<FileStreamBuf>(pipe_);
  in_ = std::make_unique<std::istream>(buf_.get());
}

InputFile::~InputFile() { close_pipe(false); }

void InputFile::close_pipe(bool check) {
  if (!pipe_) return;
  in_.reset();
  buf_.reset();
  int st = ::pclose(pipe_);
  pipe_ = nullptr;
  if (check && st != 0) {
    const int code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    throw IoError(path_ + (code == 127 ? ": cannot decompress: the bzip2 program was not found (install bzip2 or decompress the file)"
                                       : ": bzip2 decompression failed (corrupt or truncated .bz2 file?)"));
  }
}

bool InputFile::getline(std::string& line) {
  if (!in_) return false;
  if (!std::getline(*in_, line)) {
    close_pipe(true);
    return false;
  }
  if (!line.empty() && line.back() == '\r') line.pop_back();
  return true;
}

std::string first_nonblank_line(const std::string& path) {
  InputFile f(path);
  std::string line;
  while (f.getline(line))
    if (line.find_first_not_of(" \t\r\f\v") != std::string::npos) return line;
  return "";
}

std::optional<nlohmann::ordered_json> parse_json_file(const std::string& path) {
  InputFile f(path);
  try {
    return nlohmann::ordered_json::parse(f.stream(), [&](int depth, auto, auto&) { if (depth > io::kMaxJsonDepth) throw DataError(path + ": malformed JSON (nested deeper than " + std::to_string(io::kMaxJsonDepth) + " levels)"); return true; });
  } catch (const nlohmann::json::parse_error&) {
    return std::nullopt;
  }
}

static bool blank(const std::string& s) { return s.find_first_not_of(" \t\r\f\v") == std::string::npos; }

JsonRowReader::JsonRowReader(const std::string& path, int64_t limit) : path_(path), limit_(limit) {
  std::string first = first_nonblank_line(path);
  size_t k = first.find_first_not_of(" \t\r\f\v\xEF\xBB\xBF");
  if (k != std::string::npos && first[k] == '[') {
    // One JSON list: parsed from the stream (the parsed rows are held, never the raw text).
    InputFile f(path);
    try {
      list_json_ = nlohmann::ordered_json::parse(f.stream(), [&](int depth, auto, auto&) { if (depth > io::kMaxJsonDepth) throw DataError(path + ": malformed JSON (nested deeper than " + std::to_string(io::kMaxJsonDepth) + " levels)"); return true; });
    } catch (const nlohmann::json::parse_error& e) {
      throw DataError(path + ": malformed JSON (" + std::string(e.what()).substr(0, 160) + ")");
    }
    list_ = true;
    return;
  }
  file_ = std::make_unique<InputFile>(path);
}

bool JsonRowReader::skip() {
  if (limit_ > 0 && count_ >= limit_) return false;
  if (list_) {
    if (list_i_ >= list_json_.size()) return false;
    list_json_[list_i_] = nullptr;  // the skipped row's memory goes now
    ++list_i_;
    ++count_;
    return true;
  }
  std::string line;
  while (file_->getline(line)) {
    ++lineno_;
    if (blank(line)) continue;
    ++count_;
    return true;
  }
  return false;
}

bool JsonRowReader::next(JsonRow& row) {
  if (limit_ > 0 && count_ >= limit_) return false;
  if (list_) {
    if (list_i_ >= list_json_.size()) return false;
    row.at = path_ + "[" + std::to_string(list_i_) + "]";
    row.value = std::move(list_json_[list_i_]);
    ++list_i_;
    ++count_;
    return true;
  }
  std::string line;
  while (file_->getline(line)) {
    ++lineno_;
    if (blank(line)) continue;
    row.at = path_ + ":" + std::to_string(lineno_);
    try {
      row.value = io::parse_json_bounded<nlohmann::ordered_json>(line, row.at + ": malformed JSON line");
    } catch (const FormatError& e) {  // bad syntax or too deep: a data error naming file:line
      throw DataError(std::string(e.what()).substr(0, 240));  // "<file>:<line>: malformed JSON line: ..."
    }
    ++count_;
    return true;
  }
  return false;
}

int resolve_threads(int requested) {
  if (requested > 0) return requested;
  if (const char* e = std::getenv("AM_DATA_THREADS"); e && *e) {
    char* end = nullptr;
    const long v = std::strtol(e, &end, 10);
    if (end && *end == '\0' && v > 0 && v <= 4096) return static_cast<int>(v);
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true))
      log::warn(std::string("AM_DATA_THREADS='") + e + "' is not a positive number of threads; using every core");
  }
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

namespace {
// Worker threads that stay up across the chunks of one dataset, so that each keeps its tokenizer word cache
// (thread_local in the BPE model) warm; the calling thread works too. run() has parallel_samples' contract.
class SamplePool {
 public:
  explicit SamplePool(int threads) : nt_(static_cast<size_t>(std::max(1, threads))) {}
  ~SamplePool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& t : workers_) t.join();
  }
  SamplePool(const SamplePool&) = delete;
  SamplePool& operator=(const SamplePool&) = delete;

  std::vector<Sample> run(size_t n, const std::function<Sample(size_t)>& fn) {
    std::vector<Sample> out(n);
    if (std::min(nt_, (n + kBlock - 1) / kBlock) <= 1) {
      for (size_t i = 0; i < n; ++i) out[i] = fn(i);
      return out;
    }
    while (workers_.size() + 1 < nt_) workers_.emplace_back([this] { loop(); });
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      out_ = &out;
      n_ = n;
      next_.store(0);
      first_err_.store(n);
      err_ = nullptr;
      active_ = workers_.size();
      ++gen_;
    }
    start_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [&] { return active_ == 0; });
    fn_ = nullptr;
    out_ = nullptr;
    if (err_) std::rethrow_exception(err_);
    return out;
  }

 private:
  static constexpr size_t kBlock = 8;
  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    while (true) {
      start_.wait(lk, [&] { return stop_ || gen_ != seen; });
      if (stop_) return;
      seen = gen_;
      lk.unlock();
      work();
      lk.lock();
      if (--active_ == 0) done_.notify_all();
    }
  }
  // Blocks of kBlock indices taken in turn; a call that throws stops the work past it (the lowest failing
  // index wins, as a sequential loop would fail there).
  void work() {
    const size_t n = n_;
    while (true) {
      const size_t begin = next_.fetch_add(kBlock);
      if (begin >= n || begin > first_err_.load()) return;
      for (size_t i = begin; i < std::min(n, begin + kBlock); ++i) {
        if (i > first_err_.load()) return;
        try {
          (*out_)[i] = (*fn_)(i);
        } catch (...) {
          std::lock_guard<std::mutex> lk(err_mu_);
          if (i < first_err_.load()) {
            first_err_.store(i);
            err_ = std::current_exception();
          }
          return;
        }
      }
    }
  }

  const size_t nt_;
  std::vector<std::thread> workers_;
  std::mutex mu_, err_mu_;
  std::condition_variable start_, done_;
  bool stop_ = false;
  uint64_t gen_ = 0;
  size_t active_ = 0;
  const std::function<Sample(size_t)>* fn_ = nullptr;
  std::vector<Sample>* out_ = nullptr;
  size_t n_ = 0;
  std::atomic<size_t> next_{0}, first_err_{0};
  std::exception_ptr err_;
};
}  // namespace

std::vector<Sample> parallel_samples(size_t n, int threads, const std::function<Sample(size_t)>& fn) {
  SamplePool pool(resolve_threads(threads));
  return pool.run(n, fn);
}

namespace {
// Rows are gathered in chunks and each chunk is converted on `threads` threads, so only a chunk of raw rows
// is held at a time. A read error (a bad line) is reported after the rows before it are converted, so the
// error a caller sees is the first in file order, as a sequential pass would meet it.
std::vector<Sample> map_rows_chunked(const DataSource& src, const RowQuery& q, int threads,
                                     const std::function<Sample(const JsonRow&)>& fn, const RowFileOpener& opener) {
  const int nt = resolve_threads(threads);
  const size_t chunk = std::max<size_t>(1024, 256 * static_cast<size_t>(nt));
  SamplePool pool(nt);  // one set of threads for every chunk
  std::vector<Sample> out;
  std::vector<JsonRow> rows;
  auto flush = [&] {
    std::vector<JsonRow> batch = std::move(rows);  // taken first: a conversion error leaves nothing behind
    rows.clear();
    auto part = pool.run(batch.size(), [&](size_t i) { return fn(batch[i]); });
    out.insert(out.end(), std::make_move_iterator(part.begin()), std::make_move_iterator(part.end()));
  };
  std::exception_ptr err;
  try {
    for_each_row(src, q, [&](JsonRow&& r) {
      rows.push_back(std::move(r));
      if (rows.size() >= chunk) flush();
      return true;
    }, opener);
  } catch (...) {
    err = std::current_exception();
  }
  flush();  // the rows read before a read error
  if (err) std::rethrow_exception(err);
  return out;
}
}  // namespace

std::vector<Sample> map_json_rows(const std::string& path, int64_t limit, int threads,
                                  const std::function<Sample(const JsonRow&)>& fn) {
  RowQuery q;
  q.limit = limit;
  return map_rows_chunked(single_file_source(path), q, threads, fn, {});
}

std::vector<Sample> map_json_rows(const TextDatasetOptions& o, const std::function<Sample(const JsonRow&)>& fn,
                                  const RowFileOpener& opener) {
  RowQuery q;
  q.split = o.split.empty() ? "train" : o.split;
  q.split_key = o.split_key;
  q.limit = o.limit;
  return map_rows_chunked(o.source.splits.empty() ? single_file_source(o.path) : o.source, q, o.num_threads, fn, opener);
}

std::vector<Sample> tokenise_cached(const TextDatasetOptions& o, const std::string& kind, const std::string& params,
                                    bool uses_chat_template, const std::function<std::vector<Sample>()>& build) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string name = kind + "(" + o.path + ")";
  std::string key, path;
  if (o.cache && dataset_cache_enabled_by_env()) {
    const std::string dir = dataset_cache_dir();
    if (!dir.empty()) {
      const DataSource src = o.source.splits.empty() ? single_file_source(o.path) : o.source;
      TokenCacheKeyParts p;
      p.kind = kind;
      p.params = params;
      p.tokenizer_dir = o.tokenizer_dir;
      p.chat_template = o.chat_template;
      p.uses_chat_template = uses_chat_template;
      p.source = &src;
      p.split = o.split.empty() ? "train" : o.split;
      p.limit = o.limit;
      key = token_cache_key(p);
      path = token_cache_path(dir, key);
      if (auto hit = read_token_cache(path, key)) {
        char took[32];
        std::snprintf(took, sizeof took, "%.2f s", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        log::info("tokenised dataset: cache hit " + path + " (" + name + ", " + std::to_string(hit->size()) +
                  " samples, " + took + ")");
        return std::move(*hit);
      }
    }
  }
  std::vector<Sample> samples = build();
  char took[64];
  const int nt = resolve_threads(o.num_threads);
  std::snprintf(took, sizeof took, "%.2f s (%d thread%s)",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), nt, nt == 1 ? "" : "s");
  std::string msg = "tokenised dataset: " + std::to_string(samples.size()) + " samples in " + took;
  if (!path.empty() && write_token_cache(path, key, samples)) msg += ", cached to " + path;
  log::info(msg + " (" + name + ")");
  return samples;
}

std::unique_ptr<Dataset> finish_text_dataset(const std::string& name, std::vector<Sample> samples,
                                             const TextDatasetOptions& o) {
  apply_length_limit(samples, o.length, name);
  for (const auto& s : samples)
    for (int32_t id : s.input_ids)
      if (id < 0 || (o.vocab_size > 0 && id >= o.vocab_size))
        throw DataError(name + ": token id " + std::to_string(id) + " is out of range for vocab_size " +
                        std::to_string(o.vocab_size) + " (tokenizer does not match the model?)");
  if (samples.empty()) throw DataError(name + ": the dataset has no samples");
  return std::make_unique<VectorDataset>(name, std::move(samples));
}

}  // namespace am
