// seq_length / max_length / drop_long_samples / truncation and the sample-count keys, for every dataset kind
// (tokenized_jsonl, mock, chat, squad, column_mapped, hellaswag): one shared truncate-or-drop rule, bad values
// refused with exit 2 naming the key. The text kinds use a tiny byte-level tokenizer written here, so these
// tests never depend on the downloaded tokenizer cache.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/dataset.h"
#include "data/length_limit.h"
#include "config/recipe.h"

using namespace am;
namespace fs = std::filesystem;

namespace {

fs::path tmp_dir() {
  static fs::path d = [] {
    fs::path p = fs::temp_directory_path() / ("am_dataset_limits_" + std::to_string(::getpid()));
    fs::create_directories(p);
    return p;
  }();
  return d;
}

std::string write_file(const std::string& name, const std::string& text) {
  fs::path p = tmp_dir() / name;
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}

// A byte-level BPE without merges (one token per byte) plus three special tokens, and a ChatML template.
std::string tiny_tokenizer() {
  static std::string dir = [] {
    fs::path d = tmp_dir() / "tok";
    fs::create_directories(d);
    nlohmann::json vocab = nlohmann::json::object();
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool vis = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      char32_t c = vis ? b : 256 + n++;
      std::string s;
      if (c < 0x80) {
        s.push_back(static_cast<char>(c));
      } else {
        s.push_back(static_cast<char>(0xC0 | (c >> 6)));
        s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
      }
      vocab[s] = b;
    }
    nlohmann::json added = nlohmann::json::array();
    int id = 256;
    for (const char* t : {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}) {
      vocab[t] = id;
      added.push_back({{"id", id++}, {"content", t}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                       {"normalized", false}, {"special", true}});
    }
    nlohmann::json tj = {
        {"version", "1.0"},
        {"added_tokens", added},
        {"normalizer", nullptr},
        {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
        {"post_processor", nullptr},
        {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
        {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
    std::ofstream(d / "tokenizer.json") << tj.dump();
    nlohmann::json cfg = {
        {"eos_token", "<|im_end|>"},
        {"pad_token", "<|endoftext|>"},
        {"chat_template",
         "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}};
    std::ofstream(d / "tokenizer_config.json") << cfg.dump();
    return d.string();
  }();
  return dir;
}

std::unique_ptr<Dataset> load(const std::string& yaml, int64_t vocab = 300) {
  Recipe r = Recipe::from_string(yaml, "test.yaml");
  DatasetContext ctx;
  ctx.vocab_size = vocab;
  ctx.tokenizer_dir = tiny_tokenizer();
  ctx.default_seq_len = 16;
  ctx.num_threads = 2;
  return make_dataset(r, "dataset", ctx);
}

// The message of the RecipeError loading `yaml` throws ("" when it loads or throws something else).
std::string recipe_error(const std::string& yaml) {
  try {
    Recipe r = Recipe::from_string(yaml, "test.yaml");
    DatasetContext ctx;
    ctx.vocab_size = 300;
    ctx.tokenizer_dir = tiny_tokenizer();
    ctx.default_seq_len = 16;
    make_dataset(r, r.has("dataset") ? "dataset" : "validation_dataset", ctx);
  } catch (const RecipeError& e) {
    EXPECT_EQ(e.exit_code(), 2);
    return e.what();
  } catch (const std::exception& e) {
    return std::string("other error: ") + e.what();
  }
  return "";
}

std::vector<size_t> lengths(const Dataset& ds) {
  std::vector<size_t> out;
  for (size_t i = 0; i < ds.size(); ++i) out.push_back(ds.get(i).input_ids.size());
  return out;
}

// The rule every kind must follow, checked against the same dataset loaded without a limit: each sample
// longer than L is its first L tokens (input_ids and labels together) or is gone with drop_long_samples.
void expect_limit_rule(const std::string& head, int64_t L) {
  auto full = load(head + "}");
  int64_t longer = 0;
  for (size_t i = 0; i < full->size(); ++i) longer += static_cast<int64_t>(full->get(i).input_ids.size()) > L;
  ASSERT_GT(longer, 0) << head << ": pick a smaller limit";
  ASSERT_LT(longer, static_cast<int64_t>(full->size())) << head << ": pick a larger limit";

  for (const char* key : {"seq_length", "max_length"}) {
    auto tr = load(head + ", " + key + ": " + std::to_string(L) + "}");
    ASSERT_EQ(tr->size(), full->size()) << head << " " << key;
    for (size_t i = 0; i < tr->size(); ++i) {
      const Sample &a = full->get(i), &b = tr->get(i);
      const size_t n = std::min<size_t>(a.input_ids.size(), static_cast<size_t>(L));
      EXPECT_EQ(b.input_ids, std::vector<int32_t>(a.input_ids.begin(), a.input_ids.begin() + n)) << head << " " << i;
      EXPECT_EQ(b.labels, std::vector<int32_t>(a.labels.begin(), a.labels.begin() + n)) << head << " " << i;
    }
  }
  testing::internal::CaptureStderr();
  auto dr = load(head + ", seq_length: " + std::to_string(L) + ", drop_long_samples: true}");
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(static_cast<int64_t>(dr->size()), static_cast<int64_t>(full->size()) - longer) << head;
  for (size_t i = 0; i < dr->size(); ++i) EXPECT_LE(static_cast<int64_t>(dr->get(i).input_ids.size()), L);
  // One warning line says how many were dropped.
  const std::string want = "dropped " + std::to_string(longer) + " of " + std::to_string(full->size()) + " samples longer than dataset.seq_length " + std::to_string(L);
  EXPECT_NE(err.find(want), std::string::npos) << err;
  size_t lines = 0;
  for (size_t p = err.find("dropped "); p != std::string::npos; p = err.find("dropped ", p + 1)) ++lines;
  EXPECT_EQ(lines, 1u) << err;

  // truncation: false keeps long samples whole (AutoModel's do_not_truncate), with a warning.
  testing::internal::CaptureStderr();
  auto keep = load(head + ", seq_length: " + std::to_string(L) + ", truncation: do_not_truncate}");
  const std::string kerr = testing::internal::GetCapturedStderr();
  EXPECT_EQ(lengths(*keep), lengths(*full)) << head;
  EXPECT_NE(kerr.find("kept whole"), std::string::npos) << kerr;
  // ... and drop_long_samples still drops them.
  auto keep_drop = load(head + ", seq_length: " + std::to_string(L) + ", truncation: false, drop_long_samples: true}");
  EXPECT_EQ(keep_drop->size(), dr->size());
}

const char* kHella =
    R"({"ctx": "A man is standing on a ladder next to a house. he", "endings": ["paints.", "starts painting the wall with a long roller and a bucket.", "sings.", "falls."], "label": 1})"
    "\n"
    R"({"ctx": "A dog", "endings": ["runs.", "barks."], "label": 0})"
    "\n"
    R"({"ctx": "Kids play in the yard and a ball rolls away from them quickly. then", "endings": ["one kid runs after it across the whole garden.", "x"], "label": 0})"
    "\n";

}  // namespace

TEST(DatasetLimits, TokenizedJsonlTruncatesOrDrops) {
  std::string rows;
  auto row = [](int n, bool with_labels) {
    nlohmann::json j;
    std::vector<int> ids(n), labels(n);
    for (int i = 0; i < n; ++i) {
      ids[i] = (i * 7) % 300;
      labels[i] = i < n / 2 ? -100 : ids[i];
    }
    j["input_ids"] = ids;
    if (with_labels) j["labels"] = labels;
    return j.dump() + "\n";
  };
  rows = row(3, true) + row(100, true) + row(5, false) + row(2000, false);
  const std::string p = write_file("tok.jsonl", rows);
  const std::string head = "dataset: {_target_: tokenized_jsonl, path_or_dataset: " + p;
  expect_limit_rule(head, 64);
  // limit_dataset_samples counts rows read (before dropping), as the text datasets do.
  auto lim = load(head + ", limit_dataset_samples: 2, seq_length: 64, drop_long_samples: true}");
  ASSERT_EQ(lim->size(), 1u);
  EXPECT_EQ(lim->get(0).input_ids.size(), 3u);
  // Every row too long and drop_long_samples: a DataError that names the limit.
  try {
    load(head + ", seq_length: 2, drop_long_samples: true}");
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("dataset.seq_length 2"), std::string::npos) << e.what();
  }
}

TEST(DatasetLimits, TokenizedJsonlHugeRowIsTruncatedFast) {
  // The issue's case: one very long row with seq_length 64 must become a 64-token sample.
  nlohmann::json j;
  std::vector<int> ids(500000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int>(i % 300);
  j["input_ids"] = ids;
  const std::string p = write_file("huge.jsonl", j.dump() + "\n" + R"({"input_ids": [1, 2, 3]})" + "\n");
  const auto t0 = std::chrono::steady_clock::now();
  auto ds = load("dataset: {_target_: tokenized_jsonl, path_or_dataset: " + p + ", seq_length: 64}");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(ds->size(), 2u);
  EXPECT_EQ(ds->get(0).input_ids.size(), 64u);
  EXPECT_EQ(ds->get(0).labels.size(), 64u);
  EXPECT_EQ(ds->get(1).input_ids.size(), 3u);
  EXPECT_LT(s, 10.0);
}

TEST(DatasetLimits, MockHonoursTheLimit) {
  // seq_len is the generated length; seq_length / max_length below it truncate.
  auto a = load("dataset: {_target_: mock, seq_len: 40, num_samples: 3, max_length: 24}");
  ASSERT_EQ(a->size(), 3u);
  for (size_t i = 0; i < a->size(); ++i) {
    EXPECT_EQ(a->get(i).input_ids.size(), 24u);
    EXPECT_EQ(a->get(i).labels, a->get(i).input_ids);
  }
  auto full = load("dataset: {_target_: mock, seq_len: 40, num_samples: 3}");
  const Sample full2 = full->get(2);  // get() returns a sample by value: one copy, both iterators into it
  EXPECT_EQ(std::vector<int32_t>(full2.input_ids.begin(), full2.input_ids.begin() + 24), a->get(2).input_ids);
  // seq_length alone is the generated length (as before): no truncation.
  auto b = load("dataset: {_target_: mock, seq_length: 12, num_samples: 2}");
  EXPECT_EQ(lengths(*b), (std::vector<size_t>{12, 12}));
  auto c = load("dataset: {_target_: mock, seq_len: 12, seq_length: 40, num_samples: 2}");
  EXPECT_EQ(lengths(*c), (std::vector<size_t>{12, 12}));
  // Dropping every sample is refused up front, naming the key.
  std::string e = recipe_error("dataset: {_target_: mock, seq_len: 40, seq_length: 24, drop_long_samples: true}");
  EXPECT_NE(e.find("dataset.seq_length"), std::string::npos) << e;
  e = recipe_error("dataset: {_target_: mock, seq_len: 0}");
  EXPECT_NE(e.find("dataset.seq_len'"), std::string::npos) << e;
  e = recipe_error("dataset: {_target_: mock, seq_len: 8, num_samples: 0}");
  EXPECT_NE(e.find("dataset.num_samples"), std::string::npos) << e;
  e = recipe_error("dataset: {_target_: mock, seq_len: 8, num_samples: -3}");
  EXPECT_NE(e.find("dataset.num_samples"), std::string::npos) << e;
}

TEST(DatasetLimits, ChatTruncatesOrDrops) {
  const std::string p = write_file(
      "chat.jsonl",
      R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})" "\n"
      R"({"messages": [{"role": "user", "content": "Tell me a long story about a cat."}, {"role": "assistant", "content": "Once upon a time a cat sat on a very long mat and slept all day."}]})" "\n"
      R"({"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because the sky is blue and the grass is green."}]})" "\n");
  expect_limit_rule("dataset: {_target_: chat, path_or_dataset: " + p, 60);
}

TEST(DatasetLimits, SquadTruncatesOrDrops) {
  const std::string p = write_file(
      "squad.jsonl",
      R"({"context": "Paris is the capital of France.", "question": "What is the capital of France?", "answers": {"text": ["Paris"]}})" "\n"
      R"({"context": "Short.", "question": "Q?", "answers": {"text": ["A"]}})" "\n"
      R"({"context": "The Nile is a major north-flowing river in northeastern Africa, and it is very long indeed.", "question": "Where is the Nile?", "answers": {"text": ["northeastern Africa"]}})" "\n");
  expect_limit_rule("dataset: {_target_: squad, path_or_dataset: " + p, 90);
}

TEST(DatasetLimits, ColumnMappedTruncatesOrDrops) {
  const std::string p = write_file(
      "cm.jsonl",
      R"({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})" "\n"
      R"({"instruction": "Write a sentence about the sea, the sky and the wind over the hills.", "input": "", "output": "The sea is wide, the sky is grey, and the wind blows over the hills."})" "\n");
  expect_limit_rule("dataset: {_target_: column_mapped, path_or_dataset: " + p +
                        ", column_mapping: {context: input, question: instruction, answer: output}",
                    70);
}

TEST(DatasetLimits, HellaSwagTruncatesOrDrops) {
  const std::string p = write_file("hella.jsonl", kHella);
  expect_limit_rule("dataset: {_target_: hellaswag, path_or_dataset: " + p, 40);
}

TEST(DatasetLimits, BadValuesAreRecipeErrorsNamingTheKey) {
  const std::string p = write_file("ok.jsonl", R"({"input_ids": [1, 2, 3]})" "\n");
  const std::string tj = "dataset: {_target_: tokenized_jsonl, path_or_dataset: " + p;
  const std::string chat = "dataset: {_target_: chat, path_or_dataset: " + p;
  const std::string hella = "dataset: {_target_: hellaswag, path_or_dataset: " + p;
  struct Case {
    std::string yaml, key;
  };
  const std::vector<Case> cases = {
      {tj + ", seq_length: 0}", "'dataset.seq_length'"},
      {tj + ", seq_length: -5}", "'dataset.seq_length'"},
      {tj + ", max_length: 0}", "'dataset.max_length'"},
      {chat + ", seq_length: 0}", "'dataset.seq_length'"},
      {hella + ", max_length: -1}", "'dataset.max_length'"},
      {"dataset: {_target_: mock, seq_len: 8, seq_length: 0}", "'dataset.seq_length'"},
      {tj + ", limit_dataset_samples: -1}", "'dataset.limit_dataset_samples'"},
      {hella + ", num_samples_limit: -2}", "'dataset.num_samples_limit'"},
      {tj + ", truncation: sometimes}", "'dataset.truncation'"},
      {"validation_dataset: {_target_: tokenized_jsonl, path_or_dataset: " + p + ", seq_length: 0}",
       "'validation_dataset.seq_length'"},
  };
  for (const auto& c : cases) {
    const std::string e = recipe_error(c.yaml);
    EXPECT_NE(e.find(c.key), std::string::npos) << c.yaml << " -> " << e;
    EXPECT_EQ(e.find("other error"), std::string::npos) << c.yaml << " -> " << e;
  }
}

TEST(DatasetLimits, ApplyLengthLimitDirect) {
  std::vector<Sample> s = {{{1, 2, 3, 4, 5}, {-100, -100, 3, 4, 5}, {}}, {{1, 2}, {1, 2}, {}}};
  LengthLimit lim;
  lim.max_len = 3;
  lim.key = "dataset.seq_length";
  auto st = apply_length_limit(s, lim, "t");
  EXPECT_EQ(st.truncated, 1);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].input_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(s[0].labels, (std::vector<int32_t>{-100, -100, 3}));
  lim.drop_long = true;
  lim.max_len = 2;
  std::vector<Sample> s2 = {{{1, 2, 3}, {1, 2, 3}, {}}, {{1, 2}, {1, 2}, {}}, {{4, 5, 6}, {4, 5, 6}, {}}};
  st = apply_length_limit(s2, lim, "t");
  EXPECT_EQ(st.dropped, 2);
  ASSERT_EQ(s2.size(), 1u);
  EXPECT_EQ(s2[0].input_ids, (std::vector<int32_t>{1, 2}));
  std::vector<Sample> s3 = {{{1, 2, 3}, {1, 2, 3}, {}}};
  EXPECT_THROW(apply_length_limit(s3, lim, "t"), DataError);
}
