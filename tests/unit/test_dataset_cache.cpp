// Start-up of text datasets (issue 14): parallel tokenisation equal to the serial path on real data, the
// on-disk tokenised-dataset cache (data/token_cache.h: hit, misses, corrupt files rebuilt) and AM_DATA_THREADS.
//
// This file also points every test of am_tests at a private, empty cache folder (AM_CACHE_DIR), so that no test reads or fills the user's ~/.cache/automodel, and every dataset any test
// builds twice goes through the cache.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/recipe.h"
#include "core/error.h"
#include "data/dataset.h"
#include "data/source.h"
#include "data/text_common.h"
#include "data/token_cache.h"

using namespace am;
namespace fs = std::filesystem;

namespace {

class PrivateCacheDir : public ::testing::Environment {
 public:
  void SetUp() override {
    dir_ = (fs::temp_directory_path() / ("am_tests_cache_" + std::to_string(::getpid()))).string();
    fs::remove_all(dir_);
    ::setenv("AM_CACHE_DIR", dir_.c_str(), 1);
  }
  void TearDown() override {
    if (dir_.empty()) return;
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

 private:
  std::string dir_;
};
[[maybe_unused]] ::testing::Environment* const g_cache_env = ::testing::AddGlobalTestEnvironment(new PrivateCacheDir);

// Sets (or unsets, value = nullopt) an environment variable for the scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) ::setenv(name, value->c_str(), 1);
    else ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_) ::setenv(name_, old_->c_str(), 1);
    else ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

std::string src_dir() { return AM_SOURCE_DIR; }
std::string tok_dir(const std::string& name) {
  const char* env = std::getenv("AM_TOKENIZER_CACHE");
  return (env ? std::string(env) : src_dir() + "/.cache/tokenizers") + "/" + name;
}
bool have_tok(const std::string& name) { return fs::exists(tok_dir(name) + "/tokenizer.json"); }
#define REQUIRE_TOK(name) \
  if (!have_tok(name)) GTEST_SKIP() << tok_dir(name) << " missing: run tools/fetch_tokenizers.sh"

// W4's data (SQuAD v1.1 dev, ../shared/datasets/squad) when this checkout has it, else the 30-question
// fixture slice of it.
std::string squad_file() {
  const std::string shared = src_dir() + "/../shared/datasets/squad/dev-v1.1.rebuilt.json";
  return fs::exists(shared) ? shared : src_dir() + "/tests/fixtures/data/squad_dev_subset.json";
}

std::unique_ptr<Dataset> load(const std::string& section_yaml, const std::string& tokdir, int threads = 0) {
  Recipe r = Recipe::from_string("dataset: " + section_yaml, "test.yaml");
  DatasetContext ctx;
  ctx.tokenizer_dir = tokdir;
  ctx.num_threads = threads;
  return make_dataset(r, "dataset", ctx);
}

std::vector<Sample> all(const Dataset& d) {
  std::vector<Sample> v;
  for (size_t i = 0; i < d.size(); ++i) v.push_back(d.get(i));
  return v;
}

void expect_same(const std::vector<Sample>& a, const std::vector<Sample>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].input_ids, b[i].input_ids) << what << ": sample " << i;
    ASSERT_EQ(a[i].labels, b[i].labels) << what << ": sample " << i;
    ASSERT_EQ(a[i].seq_lens, b[i].seq_lens) << what << ": sample " << i;
  }
}

// A fresh cache folder for one test (AM_CACHE_DIR set for its scope).
struct TestCache {
  std::string root;
  ScopedEnv env;
  ScopedEnv on;
  explicit TestCache(const std::string& name)
      : root(fresh(name)), env("AM_CACHE_DIR", root), on("AM_DATASET_CACHE", std::nullopt) {}
  static std::string fresh(const std::string& name) {
    const fs::path p = fs::temp_directory_path() / ("am_cache_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(p);
    return p.string();
  }
  std::vector<fs::path> files() const {
    std::vector<fs::path> v;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(fs::path(root) / "datasets", ec))
      if (e.path().extension() == ".tokds") v.push_back(e.path());
    std::sort(v.begin(), v.end());
    return v;
  }
  ~TestCache() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }
};

// Loads with stderr captured; returns the samples and what was logged.
std::pair<std::vector<Sample>, std::string> load_logged(const std::string& section_yaml, const std::string& tokdir,
                                                        int threads = 0) {
  ::testing::internal::CaptureStderr();
  std::vector<Sample> s;
  try {
    s = all(*load(section_yaml, tokdir, threads));
  } catch (...) {
    ::testing::internal::GetCapturedStderr();
    throw;
  }
  return {std::move(s), ::testing::internal::GetCapturedStderr()};
}

std::string copy_tokenizer(const std::string& from, const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("am_cache_tok_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    if (fs::exists(fs::path(from) / f)) fs::copy_file(fs::path(from) / f, d / f);
  return d.string();
}

}  // namespace

// Formatting + tokenising SQuAD on several threads gives the serial samples bit for bit, across chunk
// boundaries (rows are converted 1024 at a time by one pool of threads).
TEST(DatasetStartup, ParallelEqualsSerialOnRealSquad) {
  REQUIRE_TOK("llama3_1");
  ScopedEnv off("AM_DATASET_CACHE", "0");
  const std::string sec = "{_target_: squad, dataset_name: " + squad_file() + ", limit_dataset_samples: 2600}";
  const auto serial = all(*load(sec, tok_dir("llama3_1"), 1));
  ASSERT_GT(serial.size(), 20u);
  for (int th : {2, 3, 7}) expect_same(serial, all(*load(sec, tok_dir("llama3_1"), th)), std::to_string(th) + " threads");
  // AM_DATA_THREADS picks the count when the context leaves it at 0.
  ScopedEnv threads("AM_DATA_THREADS", "3");
  EXPECT_EQ(resolve_threads(0), 3);
  EXPECT_EQ(resolve_threads(5), 5);  // an explicit count wins
  expect_same(serial, all(*load(sec, tok_dir("llama3_1"), 0)), "AM_DATA_THREADS=3");
}

TEST(DatasetStartup, DataThreadsEnvFallsBackToEveryCore) {
  ScopedEnv unset("AM_DATA_THREADS", std::nullopt);
  const int every = resolve_threads(0);
  EXPECT_GE(every, 1);
  for (const char* bad : {"lots", "0", "-2", "3x", ""}) {
    ScopedEnv env("AM_DATA_THREADS", std::string(bad));
    EXPECT_EQ(resolve_threads(0), every) << bad;
  }
}

// Second load: read from the cache, the same samples as built; the length limit is applied after the cache,
// so a different seq_length reads the same file and still truncates as without a cache.
TEST(DatasetStartup, CacheHitGivesIdenticalSamples) {
  REQUIRE_TOK("llama3_1");
  TestCache cache("hit");
  const std::string tk = tok_dir("llama3_1");
  const std::string sec = "{_target_: squad, dataset_name: " + squad_file() + ", limit_dataset_samples: 300";
  auto [built, log1] = load_logged(sec + "}", tk);
  EXPECT_NE(log1.find("tokenised dataset: " + std::to_string(built.size()) + " samples in "), std::string::npos) << log1;
  EXPECT_NE(log1.find("cached to " + cache.root), std::string::npos) << log1;
  ASSERT_EQ(cache.files().size(), 1u);
  auto [hit, log2] = load_logged(sec + "}", tk);
  EXPECT_NE(log2.find("tokenised dataset: cache hit " + cache.files()[0].string()), std::string::npos) << log2;
  expect_same(built, hit, "cache hit");
  {
    ScopedEnv off("AM_DATASET_CACHE", "0");
    auto [fresh, log3] = load_logged(sec + "}", tk);
    EXPECT_EQ(log3.find("cache"), std::string::npos) << log3;
    expect_same(fresh, hit, "no cache");
    auto [fresh_short, log4] = load_logged(sec + ", seq_length: 40}", tk);
    EXPECT_EQ(log4.find("cache"), std::string::npos) << log4;
    ScopedEnv on("AM_DATASET_CACHE", "1");
    auto [cached_short, log5] = load_logged(sec + ", seq_length: 40}", tk);
    EXPECT_NE(log5.find("cache hit"), std::string::npos) << log5;
    expect_same(fresh_short, cached_short, "seq_length after the cache");
    for (const auto& s : cached_short) EXPECT_LE(s.input_ids.size(), 40u);
  }
  EXPECT_EQ(cache.files().size(), 1u);
  // Packing is applied to the samples that come out of the cache.
  Recipe r = Recipe::from_string("dataset: " + sec + "}", "test.yaml");
  DatasetContext ctx;
  ctx.tokenizer_dir = tk;
  auto packed = pack_dataset(*make_dataset(r, "dataset", ctx), 512);
  size_t tokens = 0, packed_tokens = 0;
  for (const auto& s : built) tokens += std::min<size_t>(s.input_ids.size(), 512);
  for (size_t i = 0; i < packed->size(); ++i) packed_tokens += packed->get(i).input_ids.size();
  EXPECT_EQ(tokens, packed_tokens);
}

// Whatever the tokens depend on is in the key: the tokenizer's files, the data, the row limit, the split
// expression, the chat template override and the kind's formatting keys each make a new cache entry.
TEST(DatasetStartup, CacheMissesWhenTokenizerDataOrKeysChange) {
  REQUIRE_TOK("llama3_1");
  TestCache cache("miss");
  const std::string tk = copy_tokenizer(tok_dir("llama3_1"), "miss");
  const fs::path data = fs::temp_directory_path() / ("am_cache_data_" + std::to_string(::getpid()) + ".json");
  fs::copy_file(squad_file(), data, fs::copy_options::overwrite_existing);
  const std::string sec = "{_target_: squad, dataset_name: " + data.string() + ", limit_dataset_samples: 40";
  auto [a, l1] = load_logged(sec + "}", tk);
  ASSERT_EQ(cache.files().size(), 1u);

  // tokenizer_config.json edited (no eos appended any more: the samples change too)
  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(fs::path(tk) / "tokenizer_config.json"));
  cfg["eos_token"] = "<|end_of_text|>";
  std::ofstream(fs::path(tk) / "tokenizer_config.json") << cfg.dump();
  auto [b, l2] = load_logged(sec + "}", tk);
  EXPECT_EQ(l2.find("cache hit"), std::string::npos) << l2;
  EXPECT_EQ(cache.files().size(), 2u);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_NE(a[0].input_ids, b[0].input_ids);  // eos differs: a stale hit would have kept it
  {
    ScopedEnv off("AM_DATASET_CACHE", "0");
    expect_same(b, load_logged(sec + "}", tk).first, "edited tokenizer");
  }

  // tokenizer.json: one byte of whitespace changes the content hash
  {
    std::ofstream f(fs::path(tk) / "tokenizer.json", std::ios::app);
    f << "\n";
  }
  auto [c, l3] = load_logged(sec + "}", tk);
  EXPECT_EQ(l3.find("cache hit"), std::string::npos) << l3;
  EXPECT_EQ(cache.files().size(), 3u);
  expect_same(b, c, "whitespace in tokenizer.json");

  // the limit, the split slice, a chat template override
  load_logged("{_target_: squad, dataset_name: " + data.string() + ", limit_dataset_samples: 41}", tk);
  EXPECT_EQ(cache.files().size(), 4u);
  load_logged(sec + ", split: 'train[:30]'}", tk);
  EXPECT_EQ(cache.files().size(), 5u);
  auto [t, l4] = load_logged(sec + ", chat_template: '{% for m in messages %}{{ m.content }}|{% endfor %}'}", tk);
  EXPECT_EQ(cache.files().size(), 6u);
  EXPECT_NE(t[0].input_ids, c[0].input_ids);

  // the data file's content (same path, same size)
  std::string text;
  {
    std::ifstream f(data, std::ios::binary);
    text.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  const size_t q = text.find("\"question\": \"");
  ASSERT_NE(q, std::string::npos);
  text[q + 13] = text[q + 13] == 'X' ? 'Y' : 'X';
  std::ofstream(data, std::ios::binary | std::ios::trunc) << text;
  auto [d, l5] = load_logged(sec + "}", tk);
  EXPECT_EQ(l5.find("cache hit"), std::string::npos) << l5;
  EXPECT_EQ(cache.files().size(), 7u);
  EXPECT_NE(d[0].input_ids, c[0].input_ids);

  // column_mapped: the mapping and answer_only_loss_mask are part of the key
  const fs::path rows = fs::temp_directory_path() / ("am_cache_cm_" + std::to_string(::getpid()) + ".jsonl");
  std::ofstream(rows) << "{\"q\": \"one\", \"a\": \"two\", \"b\": \"three\"}\n{\"q\": \"four\", \"a\": \"five\", \"b\": \"six\"}\n";
  const std::string cm = "{_target_: column_mapped, path_or_dataset: " + rows.string();
  auto [m1, lm1] = load_logged(cm + ", column_mapping: {question: q, answer: a}}", tk);
  auto [m2, lm2] = load_logged(cm + ", column_mapping: {question: q, answer: b}}", tk);
  auto [m3, lm3] = load_logged(cm + ", column_mapping: {question: q, answer: b}, answer_only_loss_mask: false}", tk);
  EXPECT_EQ(lm2.find("cache hit"), std::string::npos) << lm2;
  EXPECT_EQ(lm3.find("cache hit"), std::string::npos) << lm3;
  EXPECT_NE(m1[0].input_ids, m2[0].input_ids);
  EXPECT_EQ(m2[0].input_ids, m3[0].input_ids);
  EXPECT_NE(m2[0].labels, m3[0].labels);
  EXPECT_EQ(cache.files().size(), 10u);
  fs::remove_all(tk);
  fs::remove(data);
  fs::remove(rows);
}

// A cache file that is truncated, corrupt, of another format version or made for another key is ignored
// with a one-line warning, and rebuilt: the samples are the ones the tokenizer makes, and the next load hits.
TEST(DatasetStartup, CorruptCacheFileIsRebuilt) {
  REQUIRE_TOK("llama3_1");
  TestCache cache("corrupt");
  const std::string tk = tok_dir("llama3_1");
  const std::string sec = "{_target_: squad, dataset_name: " + squad_file() + ", limit_dataset_samples: 60}";
  const auto good = load_logged(sec, tk).first;
  ASSERT_EQ(cache.files().size(), 1u);
  const fs::path file = cache.files()[0];
  std::string bytes;
  {
    std::ifstream f(file, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  struct Case {
    std::string name, content, warning;
  };
  std::string flipped = bytes, version = bytes, key = bytes;
  flipped[bytes.size() - 100] ^= 0x5a;  // a label or a token id
  version[8] = 99;
  const size_t k = key.find("limit: 60");
  ASSERT_NE(k, std::string::npos);
  key[k + 7] = '7';
  const std::vector<Case> cases = {
      {"truncated", bytes.substr(0, bytes.size() / 2), "truncated"},
      {"empty", "", "not a tokenised dataset file"},
      {"flipped byte", flipped, "checksum mismatch"},
      {"version", version, "format version 99"},
      {"other key", key, "another key"},
      {"garbage", std::string(4096, 'x'), "not a tokenised dataset file"},
  };
  for (const auto& c : cases) {
    std::ofstream(file, std::ios::binary | std::ios::trunc) << c.content;
    auto [s, log] = load_logged(sec, tk);
    EXPECT_NE(log.find("warning: tokenised dataset cache: ignoring " + file.string()), std::string::npos) << c.name << ": " << log;
    EXPECT_NE(log.find(c.warning), std::string::npos) << c.name << ": " << log;
    EXPECT_NE(log.find("cached to " + file.string()), std::string::npos) << c.name << ": " << log;
    expect_same(good, s, c.name);
    auto [again, log2] = load_logged(sec, tk);
    EXPECT_NE(log2.find("cache hit"), std::string::npos) << c.name << ": " << log2;
    EXPECT_EQ(log2.find("warning"), std::string::npos) << c.name << ": " << log2;
    expect_same(good, again, c.name + " (rebuilt)");
  }
  EXPECT_EQ(cache.files().size(), 1u);
  // No temporary files are left behind.
  size_t entries = 0;
  for (const auto& e : fs::directory_iterator(fs::path(cache.root) / "datasets")) entries += e.is_regular_file();
  EXPECT_EQ(entries, 1u);
}

// An unwritable cache folder costs a warning, never the run.
TEST(DatasetStartup, UnwritableCacheFolderOnlyWarns) {
  REQUIRE_TOK("llama3_1");
  const fs::path blocker = fs::temp_directory_path() / ("am_cache_blocker_" + std::to_string(::getpid()));
  std::ofstream(blocker) << "a file where the cache folder would be";
  ScopedEnv env("AM_CACHE_DIR", blocker.string());
  ScopedEnv on("AM_DATASET_CACHE", std::nullopt);
  auto [s, log] = load_logged("{_target_: squad, dataset_name: " + squad_file() + ", limit_dataset_samples: 5}",
                              tok_dir("llama3_1"));
  EXPECT_EQ(s.size(), 5u);
  EXPECT_NE(log.find("warning: tokenised dataset cache: cannot write"), std::string::npos) << log;
  fs::remove(blocker);
}

TEST(DatasetStartup, Hash128StreamsAndDiffers) {
  std::string big(3 * (1 << 20) + 17, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 2654435761u) >> 13);
  const fs::path p = fs::temp_directory_path() / ("am_hash_" + std::to_string(::getpid()));
  std::ofstream(p, std::ios::binary) << big;
  auto h = hash_file(p.string());
  ASSERT_TRUE(h);
  EXPECT_EQ(*h, hash128(big));  // 1 MiB pieces hash as the whole
  EXPECT_EQ(h->hex().size(), 32u);
  EXPECT_FALSE(hash128("") == hash128(std::string(1, '\0')));  // the length counts
  EXPECT_FALSE(hash128("abc") == hash128("abd"));
  big[big.size() / 2] ^= 1;
  EXPECT_FALSE(hash128(big) == *h);
  EXPECT_FALSE(hash_file((p.string() + ".missing")));
  fs::remove(p);
}

// A template that calls strftime_now renders the date: the date is then in the key (AM_CHAT_TEMPLATE_DATE
// when set, else today), and only then.
TEST(DatasetStartup, TemplateDateIsInTheKeyOnlyWhenUsed) {
  REQUIRE_TOK("llama3_1");
  const DataSource src = single_file_source(squad_file());
  TokenCacheKeyParts p;
  p.kind = "chat";
  p.tokenizer_dir = tok_dir("llama3_1");
  p.source = &src;
  p.split = "train";
  ScopedEnv date("AM_CHAT_TEMPLATE_DATE", "2024-07-26");
  const std::string plain = token_cache_key(p);
  EXPECT_EQ(plain.find("date:"), std::string::npos) << plain;
  p.chat_template = "{{ strftime_now('%d %b %Y') }}{% for m in messages %}{{ m.content }}{% endfor %}";
  const std::string k1 = token_cache_key(p);
  EXPECT_NE(k1.find("date: AM_CHAT_TEMPLATE_DATE=2024-07-26"), std::string::npos) << k1;
  ScopedEnv next_day("AM_CHAT_TEMPLATE_DATE", "2024-07-27");
  const std::string k2 = token_cache_key(p);
  EXPECT_NE(k1, k2);
  EXPECT_NE(token_cache_path("/c", k1), token_cache_path("/c", k2));
  EXPECT_EQ(token_cache_key(p), k2);  // deterministic
}
