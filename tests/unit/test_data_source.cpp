// Dataset names -> files -> rows (data/source.h): local files and folders split as HF `datasets` splits them,
// fake HF caches (hub snapshots with refs/main, the `datasets` Arrow cache) built in a temp dir, the split
// grammar with its rounding, limits, messages when the data is missing, cache-root precedence, and the text
// datasets reading every source kind through a recipe.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/recipe.h"
#include "core/error.h"
#include "data/dataset.h"
#include "data/source.h"
#include "data/text_common.h"
#include "tokenizer/tokenizer.h"

using namespace am;
namespace fs = std::filesystem;

namespace {

std::string src_dir() { return AM_SOURCE_DIR; }
std::string pq_fixture(const std::string& n) { return src_dir() + "/tests/fixtures/parquet/" + n; }
std::string tok_dir(const std::string& name) {
  const char* env = std::getenv("AM_TOKENIZER_CACHE");
  return (env ? std::string(env) : src_dir() + "/.cache/tokenizers") + "/" + name;
}
#define REQUIRE_TOK(name)                                \
  if (!fs::exists(tok_dir(name) + "/tokenizer.json"))    \
  GTEST_SKIP() << tok_dir(name) << " missing: run tools/fetch_tokenizers.sh"

// A fresh temp folder per test, and the HF cache variables pointed into it (restored afterwards), so no
// real cache on the machine is ever seen.
class DataSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("am_src_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    for (const char* k : {"HF_HUB_CACHE", "HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME", "HOME"}) {
      const char* v = std::getenv(k);
      saved_[k] = v ? std::optional<std::string>(v) : std::nullopt;
      ::unsetenv(k);
    }
    ::setenv("HOME", (dir_ / "home").c_str(), 1);
  }
  void TearDown() override {
    for (const auto& [k, v] : saved_) {
      if (v) ::setenv(k.c_str(), v->c_str(), 1);
      else ::unsetenv(k.c_str());
    }
    fs::remove_all(dir_);
  }
  std::string write(const std::string& rel, const std::string& text) {
    const fs::path p = dir_ / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }
  std::string copy(const std::string& from, const std::string& rel) {
    const fs::path p = dir_ / rel;
    fs::create_directories(p.parent_path());
    fs::copy_file(from, p, fs::copy_options::overwrite_existing);
    return p.string();
  }
  // JSON lines {"i": first}, {"i": first+1}, ... (n of them).
  static std::string rows(int first, int n, const std::string& tag = "") {
    std::string s;
    for (int i = first; i < first + n; ++i) s += "{\"i\": " + std::to_string(i) + (tag.empty() ? "" : ", \"tag\": \"" + tag + "\"") + "}\n";
    return s;
  }
  // A hub-cache repository: <root>/datasets--org--name/{refs/main, snapshots/<rev>/<files>}.
  std::string hub_repo(const std::string& root, const std::string& id, const std::string& rev, bool main_ref = true) {
    std::string folder = "datasets--" + id;
    for (size_t i = folder.find('/'); i != std::string::npos; i = folder.find('/', i)) folder.replace(i, 1, "--");
    const fs::path repo = dir_ / root / folder;
    fs::create_directories(repo / "snapshots" / rev);
    if (main_ref) {
      fs::create_directories(repo / "refs");
      std::ofstream(repo / "refs" / "main") << rev;
    }
    return (fs::path(root) / folder / "snapshots" / rev).string();
  }
  fs::path dir_;
  std::map<std::string, std::optional<std::string>> saved_;
};

// The "i" of every row read, and the origins.
std::vector<int> read_i(const DataSource& s, const std::string& split, int64_t limit = 0,
                        std::vector<std::string>* at = nullptr) {
  std::vector<int> out;
  RowQuery q;
  q.split = split;
  q.limit = limit;
  for_each_row(s, q, [&](JsonRow&& r) {
    out.push_back(r.value.at("i").get<int>());
    if (at) at->push_back(r.at);
    return true;
  });
  return out;
}

std::vector<int> range(int a, int b) {
  std::vector<int> v;
  for (int i = a; i < b; ++i) v.push_back(i);
  return v;
}

template <class E, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("wrong exception type: ") + e.what();
  }
  return "(no error)";
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

// ---- the split grammar and HF's rounding ---------------------------------------------------------------

TEST(DataSourceSplit, ParsesHfSplitExpressions) {
  auto s = parse_split("train");
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].split, "train");
  EXPECT_FALSE(s[0].from || s[0].to);
  s = parse_split("validation[10%:20%]");
  EXPECT_TRUE(s[0].percent);
  EXPECT_EQ(*s[0].from, 10);
  EXPECT_EQ(*s[0].to, 20);
  s = parse_split("train[:256] + test[-5:]");
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(*s[0].to, 256);
  EXPECT_FALSE(s[0].from);
  EXPECT_EQ(s[1].split, "test");
  EXPECT_EQ(*s[1].from, -5);
  s = parse_split("train[10%:](closest)+dev");
  ASSERT_EQ(s.size(), 2u);
  EXPECT_FALSE(s[0].pct1_dropremainder);
  EXPECT_EQ(s[1].split, "dev");
  s = parse_split("train[:50%](pct1_dropremainder)");
  EXPECT_TRUE(s[0].pct1_dropremainder);
  EXPECT_EQ(parse_split("train[1_000:]")[0].from.value(), 1000);
  // Bad expressions are recipe errors naming the key.
  for (const char* bad : {"", "train[5]", "train[:10](closest)", "train[:150%]", "tr ain", "train[:1__0]",
                          "train[:10](nearest)", "train+", "train[a:b]"}) {
    std::string e = error_of<RecipeError>([&] { parse_split(bad, "dataset.split"); });
    EXPECT_TRUE(has(e, "dataset.split")) << bad << ": " << e;
  }
}

TEST(DataSourceSplit, BoundsFollowHfRounding) {
  auto b = [](const std::string& spec, int64_t n) { return split_bounds(parse_split(spec)[0], n); };
  using P = std::pair<int64_t, int64_t>;
  EXPECT_EQ(b("train", 10), P(0, 10));
  EXPECT_EQ(b("train[2:5]", 10), P(2, 5));
  EXPECT_EQ(b("train[:256]", 10), P(0, 10));  // clamped
  EXPECT_EQ(b("train[-3:]", 10), P(7, 10));
  EXPECT_EQ(b("train[:-3]", 10), P(0, 7));
  EXPECT_EQ(b("train[-20:]", 10), P(0, 10));
  EXPECT_EQ(b("train[6:2]", 10), P(6, 6));  // empty
  // Percents round to the closest row, ties to even (Python's round): 50% of 5 = 2.5 -> 2, 30% of 5 = 1.5 -> 2,
  // 10% of 25 = 2.5 -> 2, 10% of 35 = 3.5 -> 4.
  EXPECT_EQ(b("train[:50%]", 5), P(0, 2));
  EXPECT_EQ(b("train[:30%]", 5), P(0, 2));
  EXPECT_EQ(b("train[10%:]", 25), P(2, 25));
  EXPECT_EQ(b("train[10%:]", 35), P(4, 35));
  EXPECT_EQ(b("train[10%:20%]", 1000), P(100, 200));
  EXPECT_EQ(b("train[-10%:]", 1000), P(900, 1000));
  // One percent bound makes both percents (HF reads "train[10%:5]" as 10%..5%).
  EXPECT_EQ(b("train[10%:50]", 1000), P(100, 500));
  // pct1_dropremainder: boundary * (n // 100); fewer than 100 rows is refused.
  EXPECT_EQ(b("train[:10%](pct1_dropremainder)", 250), P(0, 20));
  EXPECT_TRUE(has(error_of<DataError>([&] { b("train[:10%](pct1_dropremainder)", 50); }), "fewer than 100"));
  EXPECT_FALSE(split_needs_count(parse_split("train[5:10]")[0]));
  EXPECT_TRUE(split_needs_count(parse_split("train[-5:]")[0]));
  EXPECT_TRUE(split_needs_count(parse_split("train[:5%]")[0]));
}

// ---- local files -----------------------------------------------------------------------------------------

TEST_F(DataSourceTest, LocalJsonlSlicesLimitAndOrigins) {
  const std::string p = write("d.jsonl", rows(0, 4) + "\n  \n" + rows(4, 6));  // blank lines are not rows
  DataSource s = resolve_data_source(p, p);
  EXPECT_TRUE(s.single_file);
  EXPECT_EQ(read_i(s, "train"), range(0, 10));
  std::vector<std::string> at;
  EXPECT_EQ(read_i(s, "train[3:6]", 0, &at), range(3, 6));
  ASSERT_EQ(at.size(), 3u);
  EXPECT_EQ(at[0], p + ":4");
  EXPECT_EQ(at[1], p + ":7");  // after the two blank lines
  EXPECT_EQ(read_i(s, "validation[-2:]"), range(8, 10));  // one file is every split
  EXPECT_EQ(read_i(s, "train[:25%]"), range(0, 2));        // 2.5 -> 2
  EXPECT_EQ(read_i(s, "train[2:]", 3), range(2, 5));       // the limit counts rows of the slice
  EXPECT_EQ(read_i(s, "train", 4), range(0, 4));
  // A malformed line outside the slice is not read; inside it, it names file:line.
  const std::string bad = write("bad.jsonl", rows(0, 3) + "{\"i\": \n" + rows(3, 2));
  DataSource sb = resolve_data_source(bad, bad);
  EXPECT_EQ(read_i(sb, "train[:3]"), range(0, 3));
  EXPECT_TRUE(has(error_of<DataError>([&] { read_i(sb, "train"); }), "bad.jsonl:4"));
  // '+' needs splits: one file is one.
  EXPECT_TRUE(has(error_of<DataError>([&] { read_i(s, "train+validation"); }), "dataset.split"));
}

TEST_F(DataSourceTest, LocalJsonListAndParquetAndArrow) {
  const std::string p = write("l.json", "[{\"i\": 0}, {\"i\": 1}, {\"i\": 2}]");
  std::vector<std::string> at;
  EXPECT_EQ(read_i(resolve_data_source(p, p), "train[1:]", 0, &at), range(1, 3));
  EXPECT_EQ(at[0], p + "[1]");
  // The parquet engineer's fixtures: the same 22 SQuAD rows in parquet and Arrow (stream and file format).
  const auto want = nlohmann::ordered_json::parse(std::ifstream(pq_fixture("squad.json")));
  for (const char* f : {"squad_arrowrs_snappy.parquet", "squad_duckdb_v2_gzip.parquet", "squad_stream.arrow", "squad_file.arrow"}) {
    DataSource s = resolve_data_source(pq_fixture(f), pq_fixture(f));
    std::vector<nlohmann::ordered_json> got;
    std::vector<std::string> where;
    RowQuery q;
    q.split = "train[5:9]";
    for_each_row(s, q, [&](JsonRow&& r) {
      where.push_back(r.at);
      got.push_back(std::move(r.value));
      return true;
    });
    ASSERT_EQ(got.size(), 4u) << f;
    for (size_t k = 0; k < got.size(); ++k) EXPECT_EQ(got[k]["question"], want[5 + k]["question"]) << f << " row " << 5 + k;
    EXPECT_EQ(where[0], pq_fixture(f) + "[row 5]");
    q.split = "train[-10%:]";  // 10% of 22 = 2.2 -> 2 rows
    int n = 0;
    for_each_row(s, q, [&](JsonRow&&) { return ++n, true; });
    EXPECT_EQ(n, 2) << f;
  }
}

// ---- local folders: HF's data_files patterns -------------------------------------------------------------

TEST_F(DataSourceTest, FolderSplitsByFileNames) {
  write("f/train.jsonl", rows(0, 3));
  write("f/validation.jsonl", rows(100, 2));
  write("f/my-test_file.jsonl", rows(200, 1));  // "*[sep]test[sep]*"
  write("f/.hidden.jsonl", rows(900, 1));
  write("f/README.md", "# card\n");
  write("f/notes.csv", "a,b\n");
  DataSource s = resolve_data_source("f", (dir_ / "f").string());
  EXPECT_EQ(s.kind, "local folder");
  EXPECT_EQ(s.split_names(), (std::vector<std::string>{"train", "validation", "test"}));
  EXPECT_EQ(read_i(s, "validation"), range(100, 102));
  EXPECT_EQ(read_i(s, "train[1:]+test"), (std::vector<int>{1, 2, 200}));
  std::string e = error_of<DataError>([&] { read_i(s, "dev"); });
  EXPECT_TRUE(has(e, "no split 'dev'") && has(e, "train, validation, test")) << e;
}

TEST_F(DataSourceTest, FolderSplitKeywordsFollowHf) {
  // "trainer" is not the keyword "train" (a separator must follow); "dev" is validation.
  write("k/trainer.jsonl", rows(0, 1));
  write("k/dev.jsonl", rows(10, 1));
  DataSource s = resolve_data_source("k", (dir_ / "k").string());
  EXPECT_EQ(s.split_names(), (std::vector<std::string>{"validation"}));
  // Split names in folder names win over file names.
  write("d/train/a.jsonl", rows(0, 2));
  write("d/train/b.jsonl", rows(2, 1));
  write("d/eval_set/test.jsonl", rows(50, 1));  // "*[sep]..." no: "eval[sep]*" folder -> test
  DataSource d = resolve_data_source("d", (dir_ / "d").string());
  EXPECT_EQ(d.split_names(), (std::vector<std::string>{"train", "test"}));
  EXPECT_EQ(read_i(d, "train"), range(0, 3));
  // No keyword anywhere: every file is train.
  write("a/x.jsonl", rows(0, 1));
  write("a/sub/y.jsonl", rows(1, 1));
  DataSource a = resolve_data_source("a", (dir_ / "a").string());
  EXPECT_EQ(a.split_names(), (std::vector<std::string>{"train"}));
  EXPECT_EQ(read_i(a, "train"), (std::vector<int>{1, 0}));  // sorted by path, as datasets sorts: sub/y < x
  // A folder of one split only has that split.
  write("v/validation.jsonl", rows(0, 2));
  DataSource v = resolve_data_source("v", (dir_ / "v").string());
  std::string e = error_of<DataError>([&] { read_i(v, "train"); });
  EXPECT_TRUE(has(e, "no split 'train'") && has(e, "(its splits: validation)")) << e;
  // Empty folder.
  fs::create_directories(dir_ / "empty");
  EXPECT_TRUE(has(error_of<DataError>([&] { resolve_data_source("empty", (dir_ / "empty").string()); }), "no data files"));
}

TEST_F(DataSourceTest, FolderShardsSliceAcrossFiles) {
  write("s/data/train-00000-of-00002.jsonl", rows(0, 3));
  write("s/data/train-00001-of-00002.jsonl", rows(3, 3));
  write("s/data/test-00000-of-00001.jsonl", rows(100, 2));
  write("s/data/extra-00000-of-00001.jsonl", rows(500, 1));  // a named split
  DataSource s = resolve_data_source("s", (dir_ / "s").string());
  EXPECT_EQ(s.split_names(), (std::vector<std::string>{"train", "test", "extra"}));
  EXPECT_EQ(read_i(s, "train[2:5]"), range(2, 5));
  EXPECT_EQ(read_i(s, "train[4:]"), range(4, 6));
  EXPECT_EQ(read_i(s, "train[-50%:]"), range(3, 6));
  EXPECT_EQ(read_i(s, "train[:2]+test+extra"), (std::vector<int>{0, 1, 100, 101, 500}));
  EXPECT_EQ(read_i(s, "train+test", 7), (std::vector<int>{0, 1, 2, 3, 4, 5, 100}));
}

TEST_F(DataSourceTest, FolderOfSquadJsonFiles) {
  // The official SQuAD files: train-v1.1.json / dev-v1.1.json split by name, read one question per row.
  const std::string squad = R"({"data": [{"title": "t", "paragraphs": [
     {"context": "C1", "qas": [{"question": "q0", "answers": [{"text": "a0"}]}, {"question": "q1", "answers": [{"text": "a1"}]}]},
     {"context": "C2", "qas": [{"question": "q2", "answers": [{"text": "a2"}]}]}]}]})";
  write("sq/train-v1.1.json", squad);
  write("sq/dev-v1.1.json", squad);
  DataSource s = resolve_data_source("sq", (dir_ / "sq").string());
  EXPECT_EQ(s.split_names(), (std::vector<std::string>{"train", "validation"}));
}

// ---- the hub cache -----------------------------------------------------------------------------------------

TEST_F(DataSourceTest, HubCacheSnapshotRefsMainAndConfigs) {
  ::setenv("HF_HUB_CACHE", (dir_ / "hub").c_str(), 1);
  // An older snapshot (not refs/main) holds other rows: refs/main decides.
  const std::string old = hub_repo("hub", "org/ds", "0ld", false);
  write(old + "/data/train-00000-of-00001.jsonl", rows(900, 1));
  const std::string snap = hub_repo("hub", "org/ds", "abc123");
  write(snap + "/data/train-00000-of-00001.jsonl", rows(0, 4));
  // As huggingface_hub stores them: the snapshot's files are symlinks into blobs/.
  const fs::path blob = dir_ / "hub/datasets--org--ds/blobs/5e1f";
  fs::create_directories(blob.parent_path());
  std::ofstream(blob) << rows(10, 2);
  fs::create_directories(dir_ / snap / "data");
  fs::create_symlink("../../../blobs/5e1f", dir_ / snap / "data/validation-00000-of-00001.jsonl");
  DataSource s = resolve_data_source("org/ds", "org/ds");
  EXPECT_EQ(s.kind, "HF hub cache");
  EXPECT_TRUE(has(s.root, "abc123"));
  EXPECT_EQ(read_i(s, "validation"), range(10, 12));
  EXPECT_EQ(read_i(s, "train[:2]+validation[1:]"), (std::vector<int>{0, 1, 11}));
  // A revision picks another snapshot (by hash, or by a ref such as refs/convert/parquet).
  DataSourceOptions o;
  o.revision = "0ld";
  EXPECT_EQ(read_i(resolve_data_source("org/ds", "org/ds", o), "train"), (std::vector<int>{900}));
  o.revision = "v9";
  std::string e = error_of<DataError>([&] { resolve_data_source("org/ds", "org/ds", o); });
  EXPECT_TRUE(has(e, "dataset.revision") && has(e, "'v9'") && has(e, "main")) << e;
}

TEST_F(DataSourceTest, HubCacheWithoutRefsTakesTheNewestSnapshot) {
  ::setenv("HF_HUB_CACHE", (dir_ / "hub").c_str(), 1);
  const std::string a = hub_repo("hub", "solo", "aaa", false);
  write(a + "/train.jsonl", rows(0, 1));
  const std::string b = hub_repo("hub", "solo", "bbb", false);
  write(b + "/train.jsonl", rows(7, 1));
  fs::last_write_time(dir_ / a, fs::file_time_type::clock::now() - std::chrono::hours(2));
  fs::last_write_time(dir_ / b, fs::file_time_type::clock::now() - std::chrono::hours(1));
  EXPECT_EQ(read_i(resolve_data_source("solo", "solo"), "train"), (std::vector<int>{7}));
}

TEST_F(DataSourceTest, HubCacheParquetLayoutsAndCardConfigs) {
  ::setenv("HF_HUB_CACHE", (dir_ / "hub").c_str(), 1);
  // rajpurkar/squad's layout: plain_text/{train,validation}-00000-of-00001.parquet and a card naming the config.
  const std::string sq = hub_repo("hub", "rajpurkar/squad", "r1");
  copy(pq_fixture("squad_arrowrs_snappy.parquet"), sq + "/plain_text/train-00000-of-00001.parquet");
  copy(pq_fixture("squad_duckdb_v1_snappy.parquet"), sq + "/plain_text/validation-00000-of-00001.parquet");
  write(sq + "/README.md", "---\nconfigs:\n- config_name: plain_text\n  data_files:\n  - split: train\n    path: plain_text/train-*\n"
                           "  - split: validation\n    path: plain_text/validation-*\n  default: true\n---\n# SQuAD\n");
  DataSource s = resolve_data_source("rajpurkar/squad", "rajpurkar/squad");
  EXPECT_EQ(s.config, "plain_text");
  EXPECT_EQ(s.split_names(), (std::vector<std::string>{"train", "validation"}));
  ASSERT_EQ(s.files_of("validation")->size(), 1u);
  EXPECT_EQ(s.files_of("validation")->front().format, DataFormat::Parquet);
  int n = 0;
  RowQuery q;
  q.split = "validation[:10%]";  // 2.2 -> 2
  for_each_row(s, q, [&](JsonRow&& r) {
    EXPECT_TRUE(r.value.contains("answers"));
    return ++n, true;
  });
  EXPECT_EQ(n, 2);
  // Two configs in the card, no default: `name` must choose.
  const std::string mc = hub_repo("hub", "org/multi", "m1");
  write(mc + "/main/train-00000-of-00001.jsonl", rows(0, 2));
  write(mc + "/socratic/train-00000-of-00001.jsonl", rows(50, 2));
  write(mc + "/README.md", "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
                           "- config_name: socratic\n  data_files:\n  - split: train\n    path: socratic/train-*\n---\n");
  std::string e = error_of<DataError>([&] { resolve_data_source("org/multi", "org/multi"); });
  EXPECT_TRUE(has(e, "main, socratic") && has(e, "dataset.name")) << e;
  DataSourceOptions o;
  o.config = "socratic";
  EXPECT_EQ(read_i(resolve_data_source("org/multi", "org/multi", o), "train"), range(50, 52));
  o.config = "nope";
  e = error_of<DataError>([&] { resolve_data_source("org/multi", "org/multi", o); });
  EXPECT_TRUE(has(e, "'nope' is not a config") && has(e, "main, socratic")) << e;
  // The hub's parquet conversion (refs/convert/parquet): <config>/<split>/NNNN.parquet, config default.
  const std::string cv = hub_repo("hub", "org/conv", "c1");
  copy(pq_fixture("squad_arrowrs_zstd.parquet"), cv + "/default/train/0000.parquet");
  copy(pq_fixture("squad_arrowrs_gzip.parquet"), cv + "/default/train/0001.parquet");
  copy(pq_fixture("squad_arrowrs_none.parquet"), cv + "/default/partial-test/0000.parquet");
  copy(pq_fixture("squad_arrowrs_none.parquet"), cv + "/other/train/0000.parquet");
  DataSource c = resolve_data_source("org/conv", "org/conv");
  EXPECT_EQ(c.config, "default");
  EXPECT_EQ(c.split_names(), (std::vector<std::string>{"train", "partial-test"}));
  EXPECT_EQ(c.files_of("train")->size(), 2u);
  n = 0;
  q.split = "train[20:24]";  // crosses from the first shard (22 rows) into the second
  std::vector<std::string> at;
  for_each_row(c, q, [&](JsonRow&& r) {
    at.push_back(r.at);
    return ++n, true;
  });
  ASSERT_EQ(n, 4);
  EXPECT_TRUE(has(at[1], "0000.parquet[row 21]") && has(at[2], "0001.parquet[row 0]")) << at[1] << " " << at[2];
}

TEST_F(DataSourceTest, HubIdsAreMatchedIgnoringCase) {
  ::setenv("HF_HUB_CACHE", (dir_ / "hub").c_str(), 1);
  const std::string s = hub_repo("hub", "rowan/hellaswag", "h1");
  write(s + "/data/train-00000-of-00001.jsonl", rows(0, 2));
  EXPECT_EQ(read_i(resolve_data_source("Rowan/hellaswag", "Rowan/hellaswag"), "train"), range(0, 2));
}

// ---- the datasets library's Arrow cache ----------------------------------------------------------------

TEST_F(DataSourceTest, DatasetsArrowCache) {
  ::setenv("HF_DATASETS_CACHE", (dir_ / "dsc").c_str(), 1);
  const std::string b = "dsc/rajpurkar___squad/plain_text/0.0.0/0123abcd";
  copy(pq_fixture("squad_stream.arrow"), b + "/squad-train-00000-of-00002.arrow");
  copy(pq_fixture("squad_file.arrow"), b + "/squad-train-00001-of-00002.arrow");
  copy(pq_fixture("squad_stream.arrow"), b + "/squad-validation.arrow");
  copy(pq_fixture("squad_stream.arrow"), b + "/cache-1234.arrow");  // a map() result: not a split
  write(b + "/dataset_info.json", R"({"splits": {"train": {}, "validation": {}}})");
  // An unfinished build is not read.
  copy(pq_fixture("squad_stream.arrow"), "dsc/rajpurkar___squad/plain_text/0.0.0/9999.incomplete/squad-train.arrow");
  DataSource s = resolve_data_source("rajpurkar/squad", "rajpurkar/squad");
  EXPECT_EQ(s.kind, "HF datasets cache");
  EXPECT_EQ(s.config, "plain_text");
  EXPECT_EQ(s.split_names(), (std::vector<std::string>{"train", "validation"}));
  EXPECT_EQ(s.files_of("train")->size(), 2u);
  int n = 0;
  RowQuery q;
  q.split = "train[-3:]+validation[:1]";
  std::vector<std::string> at;
  for_each_row(s, q, [&](JsonRow&& r) {
    at.push_back(r.at);
    return ++n, true;
  });
  EXPECT_EQ(n, 4);
  EXPECT_TRUE(has(at[0], "squad-train-00001-of-00002.arrow[row 19]")) << at[0];
  EXPECT_TRUE(has(at[3], "squad-validation.arrow[row 0]")) << at[3];
  // HF_HOME/datasets when HF_DATASETS_CACHE is unset; a name without an org.
  ::unsetenv("HF_DATASETS_CACHE");
  ::setenv("HF_HOME", (dir_ / "hfhome").c_str(), 1);
  copy(pq_fixture("squad_stream.arrow"), "hfhome/datasets/my_set/default/0.0.0/ff/my_set-test.arrow");
  DataSource m = resolve_data_source("MySet", "MySet");  // camel case -> "my_set", as datasets names its folder
  EXPECT_EQ(m.split_names(), (std::vector<std::string>{"test"}));
}

// ---- where the caches are, and what is said when the data is not there ----------------------------------

TEST_F(DataSourceTest, CacheRootPrecedence) {
  // The same id in three caches with different rows: HF_HUB_CACHE, then HF_HOME/hub, then ~/.cache.
  write(hub_repo("a", "org/p", "r") + "/train.jsonl", rows(1, 1));
  write(hub_repo("hfhome/hub", "org/p", "r") + "/train.jsonl", rows(2, 1));
  write(hub_repo("home/.cache/huggingface/hub", "org/p", "r") + "/train.jsonl", rows(3, 1));
  ::setenv("HF_HUB_CACHE", (dir_ / "a").c_str(), 1);
  ::setenv("HF_HOME", (dir_ / "hfhome").c_str(), 1);
  EXPECT_EQ(read_i(resolve_data_source("org/p", "org/p"), "train"), (std::vector<int>{1}));
  ::unsetenv("HF_HUB_CACHE");
  EXPECT_EQ(read_i(resolve_data_source("org/p", "org/p"), "train"), (std::vector<int>{2}));
  ::unsetenv("HF_HOME");
  EXPECT_EQ(read_i(resolve_data_source("org/p", "org/p"), "train"), (std::vector<int>{3}));
  ::setenv("HF_HUB_CACHE", (dir_ / "a").c_str(), 1);
  const auto roots = hub_cache_roots();
  ASSERT_GE(roots.size(), 2u);
  EXPECT_EQ(roots[0], (dir_ / "a").string());
  EXPECT_EQ(roots.back(), (dir_ / "home/.cache/huggingface/hub").string());
  // The hub cache is read before the datasets cache.
  ::setenv("HF_DATASETS_CACHE", (dir_ / "dsc").c_str(), 1);
  copy(pq_fixture("squad_stream.arrow"), "dsc/org___p/default/0.0.0/h/p-train.arrow");
  EXPECT_EQ(resolve_data_source("org/p", "org/p").kind, "HF hub cache");
}

TEST_F(DataSourceTest, NotFoundSaysWhereItLookedAndHowToGetIt) {
  ::setenv("HF_HUB_CACHE", (dir_ / "hub").c_str(), 1);
  ::setenv("HF_DATASETS_CACHE", (dir_ / "dsc").c_str(), 1);
  DataSourceOptions o;
  o.key = "dataset.dataset_name";
  std::string e = error_of<DataError>([&] { resolve_data_source("rajpurkar/squad", "rajpurkar/squad", o); });
  for (const std::string& part : std::vector<std::string>{"dataset.dataset_name", "'rajpurkar/squad'", (dir_ / "hub/datasets--rajpurkar--squad").string(),
                                 (dir_ / "home/.cache/huggingface/hub/datasets--rajpurkar--squad").string(),
                                 (dir_ / "dsc/rajpurkar___squad").string(), "hf download --repo-type dataset rajpurkar/squad",
                                 "huggingface-cli download --repo-type dataset rajpurkar/squad", "local"})
    EXPECT_TRUE(has(e, part)) << "missing '" << part << "' in: " << e;
  // A path that does not exist is a missing file, not a hub id.
  e = error_of<DataError>([&] { resolve_data_source("data/train.jsonl", (dir_ / "data/train.jsonl").string()); });
  EXPECT_TRUE(has(e, "no such file or folder") && has(e, "data/train.jsonl")) << e;
  // An empty repository folder (an interrupted download) is named as such.
  fs::create_directories(dir_ / "hub/datasets--org--empty/snapshots");
  e = error_of<DataError>([&] { resolve_data_source("org/empty", "org/empty"); });
  EXPECT_TRUE(has(e, "(no snapshot)")) << e;
  // A loading-script dataset has no data files: its parquet conversion is the way.
  write(hub_repo("hub", "org/scripted", "s1") + "/scripted.py", "# a loading script\n");
  e = error_of<DataError>([&] { resolve_data_source("org/scripted", "org/scripted"); });
  EXPECT_TRUE(has(e, "no data files") && has(e, "--revision refs/convert/parquet")) << e;
}

// ---- through a recipe: every text dataset reads every source kind ---------------------------------------

namespace {
std::unique_ptr<Dataset> load_recipe(const std::string& yaml, const std::string& tokdir) {
  Recipe r = Recipe::from_string(yaml, "test.yaml");
  DatasetContext ctx;
  ctx.tokenizer_dir = tokdir;
  ctx.num_threads = 2;
  return make_dataset(r, "dataset", ctx);
}
bool same(const Dataset& a, const Dataset& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a.get(i).input_ids != b.get(i).input_ids || a.get(i).labels != b.get(i).labels) return false;
  return true;
}
}  // namespace

TEST_F(DataSourceTest, TextDatasetsReadHubIdsFoldersAndParquet) {
  REQUIRE_TOK("llama3_1");
  const std::string tok = tok_dir("llama3_1");
  ::setenv("HF_HUB_CACHE", (dir_ / "hub").c_str(), 1);
  // squad from a hub id (parquet), against the same rows as a local JSONL.
  const std::string sq = hub_repo("hub", "rajpurkar/squad", "r1");
  copy(pq_fixture("squad_arrowrs_snappy.parquet"), sq + "/plain_text/train-00000-of-00001.parquet");
  copy(pq_fixture("squad_arrowrs_zstd.parquet"), sq + "/plain_text/validation-00000-of-00001.parquet");
  const auto want = nlohmann::ordered_json::parse(std::ifstream(pq_fixture("squad.json")));
  std::string jsonl;
  for (size_t i = 4; i < 7; ++i) jsonl += want[i].dump() + "\n";  // rows 3, 9, 15, 21 have no answer
  const std::string local = write("squad3.jsonl", jsonl);
  auto hub = load_recipe("dataset: {_target_: squad, path_or_dataset: rajpurkar/squad, split: 'validation[4:7]'}", tok);
  auto file = load_recipe("dataset: {_target_: squad, path_or_dataset: " + local + "}", tok);
  EXPECT_EQ(hub->size(), 3u);
  EXPECT_TRUE(same(*hub, *file));
  EXPECT_TRUE(has(hub->name(), "rajpurkar/squad:validation[4:7]")) << hub->name();
  // limit_dataset_samples counts rows of the split expression.
  EXPECT_EQ(load_recipe("dataset: {_target_: squad, path_or_dataset: rajpurkar/squad, split: 'train[4:]', limit_dataset_samples: 5}", tok)->size(), 5u);
  // A split the dataset does not have: a data error naming the key and the splits.
  try {
    load_recipe("dataset: {_target_: squad, path_or_dataset: rajpurkar/squad, split: test}", tok);
    ADD_FAILURE() << "no error";
  } catch (const DataError& e) {
    EXPECT_TRUE(has(e.what(), "dataset.split") && has(e.what(), "train, validation")) << e.what();
  }
  // A malformed split is a recipe error.
  EXPECT_THROW(load_recipe("dataset: {_target_: squad, path_or_dataset: rajpurkar/squad, split: 'train[5]'}", tok), RecipeError);

  // chat from a local folder of parquet files (the parquet engineer's chat fixture).
  copy(pq_fixture("chat_arrowrs_v2_zstd.parquet"), "chatdir/train-00000-of-00001.parquet");
  copy(pq_fixture("chat_duckdb_v1_zstd.parquet"), "chatdir/test-00000-of-00001.parquet");
  auto chat = load_recipe("dataset: {_target_: chat, path_or_dataset: " + (dir_ / "chatdir").string() + ", split: 'test[8:12]'}", tok);  // rows 2-4 are malformed on purpose
  EXPECT_EQ(chat->size(), 4u);

  // column_mapped over hub JSONL with a named config chosen by a folder (no card).
  const std::string cm = hub_repo("hub", "org/qa", "q1");
  write(cm + "/main/train.jsonl", R"({"q": "2+2?", "a": "4"})" "\n" R"({"q": "3+3?", "a": "6"})" "\n");
  write(cm + "/other/train.jsonl", R"({"q": "x", "a": "y"})" "\n");
  const std::string cmy = "dataset: {_target_: column_mapped, path_or_dataset: org/qa, column_mapping: {question: q, answer: a}";
  try {
    auto ds = load_recipe(cmy + ", name: main}", tok);
    EXPECT_EQ(ds->size(), 2u);
  } catch (const RecipeError& e) {
    if (!has(e.what(), "unknown recipe key")) throw;
    std::cerr << "dataset.name is not in the recipe key table yet: " << e.what() << "\n";
  }
}

TEST_F(DataSourceTest, HellaswagFromHubRowsMatchesLocalJsonl) {
  REQUIRE_TOK("llama3_1");
  const std::string tok = tok_dir("llama3_1");
  ::setenv("HF_HUB_CACHE", (dir_ / "hub").c_str(), 1);
  // rowan/hellaswag's columns: label a string, endings a list, plus ind/activity_label/ctx_a/ctx_b/source_id/split/split_type.
  auto row = [](int ind, const std::string& ctx, const std::string& label) {
    nlohmann::ordered_json j;
    j["ind"] = ind;
    j["activity_label"] = "Roof shingle removal";
    j["ctx_a"] = ctx;
    j["ctx_b"] = "";
    j["ctx"] = ctx;
    j["endings"] = {" starts pulling up roofing.", " is holding a ball.", " sits down.", " walks away."};
    j["source_id"] = "activitynet~v_-JhWjGDPHMY";
    j["split"] = "val";
    j["split_type"] = "indomain";
    j["label"] = label;
    return j.dump() + "\n";
  };
  const std::string snap = hub_repo("hub", "Rowan/hellaswag", "h1");
  write(snap + "/data/train-00000-of-00001.jsonl", row(0, "A man is on a roof. He", "0") + row(1, "A dog runs. It", "3"));
  write(snap + "/data/validation-00000-of-00001.jsonl", row(5, "Two people talk. They", "2"));
  write(snap + "/data/test-00000-of-00001.jsonl", row(9, "Unlabeled. It", ""));
  const std::string local = write("hs.jsonl", R"({"ctx": "A man is on a roof. He", "endings": [" starts pulling up roofing.", "b", "c", "d"], "label": 0})" "\n"
                                              R"({"ctx": "A dog runs. It", "endings": ["a", "b", "c", " walks away."], "label": 3})" "\n");
  auto hub = load_recipe("dataset: {_target_: hellaswag, path_or_dataset: rowan/hellaswag, split: train}", tok);
  auto file = load_recipe("dataset: {_target_: hellaswag, path_or_dataset: " + local + "}", tok);
  EXPECT_TRUE(same(*hub, *file));
  EXPECT_EQ(load_recipe("dataset: {_target_: hellaswag, path_or_dataset: Rowan/hellaswag, split: 'train+validation', num_samples_limit: 3}", tok)->size(), 3u);
  try {
    load_recipe("dataset: {_target_: hellaswag, path_or_dataset: rowan/hellaswag, split: test}", tok);
    ADD_FAILURE() << "no error";
  } catch (const DataError& e) {
    EXPECT_TRUE(has(e.what(), "no \"label\"")) << e.what();
  }
  // The 6-lines-per-task text layout, sliced by task.
  std::string txt;
  for (int t = 0; t < 4; ++t) txt += "Activity: Context " + std::to_string(t) + ".\n1\nA.\n B" + std::to_string(t) + ".\nC.\nD.\n";
  const std::string tp = write("hs.txt", txt);
  auto sliced = load_recipe("dataset: {_target_: hellaswag, path_or_dataset: " + tp + ", split: 'validation[1:3]'}", tok);
  auto whole = load_recipe("dataset: {_target_: hellaswag, path_or_dataset: " + tp + "}", tok);
  ASSERT_EQ(sliced->size(), 2u);
  EXPECT_EQ(sliced->get(0).input_ids, whole->get(1).input_ids);
  EXPECT_EQ(sliced->get(1).input_ids, whole->get(2).input_ids);
}

TEST_F(DataSourceTest, SquadJsonInAFolderSlicesQuestions) {
  REQUIRE_TOK("llama3_1");
  const std::string tok = tok_dir("llama3_1");
  const std::string squad = R"({"data": [{"title": "t", "paragraphs": [
     {"context": "The sky is blue.", "qas": [{"question": "Color?", "answers": [{"text": "blue"}]}, {"question": "What?", "answers": [{"text": "sky"}]}]},
     {"context": "Paris is in France.", "qas": [{"question": "Where?", "answers": [{"text": "France"}]}]}]}]})";
  write("sq/train-v1.1.json", squad);
  write("sq/dev-v1.1.json", squad);
  auto all = load_recipe("dataset: {_target_: squad, path_or_dataset: " + (dir_ / "sq").string() + ", split: validation}", tok);
  auto two = load_recipe("dataset: {_target_: squad, path_or_dataset: " + (dir_ / "sq").string() + ", split: 'validation[1:]'}", tok);
  ASSERT_EQ(all->size(), 3u);
  ASSERT_EQ(two->size(), 2u);
  EXPECT_EQ(two->get(0).input_ids, all->get(1).input_ids);
  EXPECT_EQ(two->get(1).input_ids, all->get(2).input_ids);
}

TEST_F(DataSourceTest, RecipeDataKeys) {
  REQUIRE_TOK("llama3_1");
  const std::string tok = tok_dir("llama3_1");
  const std::string a = write("a.jsonl", R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})" "\n");
  const std::string b = write("b.jsonl", R"({"messages": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hey"}]})" "\n");
  // path_or_dataset_id (AutoModel's ChatDataset key), also as a list of local files (one split).
  try {
    EXPECT_EQ(load_recipe("dataset: {_target_: chat, path_or_dataset_id: " + a + "}", tok)->size(), 1u);
    EXPECT_EQ(load_recipe("dataset: {_target_: chat, path_or_dataset_id: [" + a + ", " + b + "], split: 'train[1:]'}", tok)->size(), 1u);
    // Two keys that disagree: a recipe error naming both.
    try {
      load_recipe("dataset: {_target_: chat, path_or_dataset_id: " + a + ", path_or_dataset: " + b + "}", tok);
      ADD_FAILURE() << "no error";
    } catch (const RecipeError& e) {
      EXPECT_TRUE(has(e.what(), "dataset.path_or_dataset_id") && has(e.what(), "dataset.path_or_dataset")) << e.what();
    }
    // squad with no name reads AutoModel's default, rajpurkar/squad: not cached here, so the message says so.
    ::setenv("HF_HUB_CACHE", (dir_ / "hub").c_str(), 1);
    try {
      load_recipe("dataset: {_target_: squad, split: train}", tok);
      ADD_FAILURE() << "no error";
    } catch (const DataError& e) {
      EXPECT_TRUE(has(e.what(), "dataset.dataset_name") && has(e.what(), "rajpurkar/squad")) << e.what();
    }
  } catch (const RecipeError& e) {
    if (!has(e.what(), "unknown recipe key")) throw;
    GTEST_SKIP() << "path_or_dataset_id is not in the recipe key table yet: " << e.what();
  }
  // hellaswag without any data key: a recipe error naming the keys.
  try {
    load_recipe("dataset: {_target_: hellaswag}", tok);
    ADD_FAILURE() << "no error";
  } catch (const RecipeError& e) {
    EXPECT_TRUE(has(e.what(), "path_or_dataset")) << e.what();
  }
}

// ---- mock: generated on demand ---------------------------------------------------------------------------

TEST(MockDataset, LazyDeterministicAndOrderFree) {
  auto make = [](const std::string& extra) {
    Recipe r = Recipe::from_string("dataset: {_target_: mock, seq_len: 16" + extra + "}", "t.yaml");
    DatasetContext ctx;
    ctx.vocab_size = 1000;
    ctx.seed = 7;
    return make_dataset(r, "dataset", ctx);
  };
  const auto t0 = std::chrono::steady_clock::now();
  auto big = make(", num_samples: 1000000");  // nothing is generated up front
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0);
  ASSERT_EQ(big->size(), 1000000u);
  const Sample last = big->get(999999);
  const Sample s5 = big->get(5);
  auto again = make(", num_samples: 1000000");
  EXPECT_EQ(again->get(5).input_ids, s5.input_ids);  // any access order, any instance: the same numbers
  EXPECT_EQ(again->get(999999).input_ids, last.input_ids);
  EXPECT_EQ(big->get(5).input_ids, s5.input_ids);
  EXPECT_NE(big->get(6).input_ids, s5.input_ids);
  EXPECT_EQ(s5.labels, s5.input_ids);
  ASSERT_EQ(s5.input_ids.size(), 16u);
  std::set<int32_t> distinct;
  for (size_t i = 0; i < 200; ++i)
    for (int32_t t : big->get(i).input_ids) {
      ASSERT_TRUE(t >= 0 && t < 1000) << t;
      distinct.insert(t);
    }
  EXPECT_GT(distinct.size(), 900u);  // 3200 draws over 1000 ids
  // A smaller num_samples gives the same first samples; a truncating limit their prefix.
  auto small = make(", num_samples: 10, max_length: 8");
  EXPECT_EQ(small->get(5).input_ids, std::vector<int32_t>(s5.input_ids.begin(), s5.input_ids.begin() + 8));
  EXPECT_THROW(small->get(10), DataError);
  // The section's own seed replaces the run's.
  auto seeded = make(", num_samples: 10, seed: 3");
  EXPECT_NE(seeded->get(5).input_ids, s5.input_ids);
  EXPECT_EQ(seeded->get(5).input_ids, make(", num_samples: 20, seed: 3")->get(5).input_ids);
}
