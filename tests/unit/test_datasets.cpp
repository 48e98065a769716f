// Text datasets (chat, squad, column_mapped), length limits and sequence packing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/dataset.h"
#include "io/model_config.h"
#include "models/hf_weights.h"
#include "tokenizer/tokenizer.h"
#include "train/recipe.h"
#include "train/trainer.h"

using namespace am;
namespace fs = std::filesystem;

namespace {
std::string src_dir() { return AM_SOURCE_DIR; }
std::string fixture(const std::string& name) { return src_dir() + "/tests/fixtures/data/" + name; }
std::string tok_dir(const std::string& name) {
  const char* env = std::getenv("AM_TOKENIZER_CACHE");
  return (env ? std::string(env) : src_dir() + "/.cache/tokenizers") + "/" + name;
}
bool have_tok(const std::string& name) { return fs::exists(tok_dir(name) + "/tokenizer.json"); }
#define REQUIRE_TOK(name) \
  if (!have_tok(name)) GTEST_SKIP() << tok_dir(name) << " missing: run tools/fetch_tokenizers.sh"

std::unique_ptr<Dataset> load(const std::string& yaml, const std::string& tokdir, int64_t vocab = 0) {
  Recipe r = Recipe::from_string(yaml, "test.yaml");
  DatasetContext ctx;
  ctx.vocab_size = vocab;
  ctx.tokenizer_dir = tokdir;
  return make_dataset(r, "dataset", ctx);
}

// The label tokens of a sample, decoded (labels equal the input ids where set).
std::string label_text(const tok::Tokenizer& t, const Sample& s) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < s.labels.size(); ++i)
    if (s.labels[i] != -100) {
      EXPECT_EQ(s.labels[i], s.input_ids[i]);
      ids.push_back(s.labels[i]);
    }
  return t.decode(ids);
}

// A copy of a tokenizer folder without a chat template (prompt/completion formatting).
std::string no_template_copy(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("am_tok_notmpl_" + name);
  fs::create_directories(d);
  fs::copy_file(tok_dir(name) + "/tokenizer.json", d / "tokenizer.json", fs::copy_options::overwrite_existing);
  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(tok_dir(name) + "/tokenizer_config.json"));
  cfg.erase("chat_template");
  std::ofstream(d / "tokenizer_config.json") << cfg.dump();
  return d.string();
}

std::string write_tmp(const std::string& name, const std::string& text) {
  fs::path p = fs::temp_directory_path() / name;
  std::ofstream(p) << text;
  return p.string();
}
}  // namespace

TEST(Datasets, ChatLabelsOnlyAssistantTurnsLlama3) {
  REQUIRE_TOK("llama3_1");
  auto ds = load("dataset: {_target_: chat, path_or_dataset: " + fixture("chat_small.jsonl") + "}", tok_dir("llama3_1"));
  ASSERT_EQ(ds->size(), 3u);
  auto t = tok::Tokenizer::from_dir(tok_dir("llama3_1"));
  const Sample& s = ds->get(0);
  // The template supplies BOS itself; it must appear exactly once.
  EXPECT_EQ(s.input_ids[0], *t.bos_id());
  EXPECT_NE(s.input_ids[1], *t.bos_id());
  EXPECT_EQ(label_text(t, s), "I am a helpful assistant.<|eot_id|>Two plus two is four.<|eot_id|>");
  EXPECT_EQ(label_text(t, ds->get(1)), "Paris.<|eot_id|>");
  // Everything that is not an assistant turn is masked: the user text never carries a label.
  std::string all = t.decode(s.input_ids);
  EXPECT_NE(all.find("What is two plus two?"), std::string::npos);
}

TEST(Datasets, ChatLabelsOnlyAssistantTurnsQwen3) {
  REQUIRE_TOK("qwen3");
  auto ds = load("dataset: {_target_: chat, path_or_dataset: " + fixture("chat_small.jsonl") + "}", tok_dir("qwen3"));
  auto t = tok::Tokenizer::from_dir(tok_dir("qwen3"));
  std::string lab = label_text(t, ds->get(0));
  EXPECT_EQ(lab.rfind("I am a helpful assistant.<|im_end|>\n", 0), 0u) << lab;
  EXPECT_NE(lab.find("Two plus two is four.<|im_end|>"), std::string::npos) << lab;
  EXPECT_EQ(lab.find("user"), std::string::npos) << lab;
  EXPECT_EQ(lab.find("What is"), std::string::npos) << lab;
}

TEST(Datasets, ChatBadLineNamesFileAndLine) {
  REQUIRE_TOK("llama3_1");
  try {
    load("dataset: {_target_: chat, path_or_dataset: " + fixture("chat_bad_line.jsonl") + "}", tok_dir("llama3_1"));
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("chat_bad_line.jsonl:2:"), std::string::npos) << e.what();
  }
  auto p = write_tmp("am_chat_nomsg.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n\n{\"text\": 1}\n");
  try {
    load("dataset: {_target_: chat, path_or_dataset: " + p + "}", tok_dir("llama3_1"));
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("am_chat_nomsg.jsonl:3:"), std::string::npos) << e.what();
  }
}

TEST(Datasets, SquadPromptAnswerSplitWithoutTemplate) {
  REQUIRE_TOK("llama3_1");
  std::string dir = no_template_copy("llama3_1");
  auto t = tok::Tokenizer::from_dir(dir);
  auto ds = load("dataset: {_target_: squad, path_or_dataset: " + fixture("squad_small.jsonl") + "}", dir);
  ASSERT_EQ(ds->size(), 2u);
  const Sample& s = ds->get(0);
  EXPECT_EQ(t.decode(s.input_ids),
            "<|begin_of_text|>Context: The Eiffel Tower is in Paris. Question: Where is the Eiffel Tower? Answer: Paris<|eot_id|>");
  EXPECT_EQ(label_text(t, s), " Paris<|eot_id|>");  // first answer only, loss on answer + eos
  EXPECT_EQ(label_text(t, ds->get(1)), "100 degrees Celsius<|eot_id|>");  // stripped; " " is its own token before digits
}

TEST(Datasets, SquadChatTemplateAnswerOnly) {
  REQUIRE_TOK("llama3_1");
  auto t = tok::Tokenizer::from_dir(tok_dir("llama3_1"));
  auto ds = load("dataset: {_target_: nemo_automodel.components.datasets.llm.squad.make_squad_dataset, path_or_dataset: " +
                     fixture("squad_dev_subset.json") + ", limit_dataset_samples: 5}",
                 tok_dir("llama3_1"));
  ASSERT_EQ(ds->size(), 5u);
  const Sample& s = ds->get(0);
  std::string full = t.decode(s.input_ids);
  EXPECT_NE(full.find("<|start_header_id|>user<|end_header_id|>\n\nContext: "), std::string::npos) << full;
  EXPECT_NE(full.find(" Question: Which NFL team represented the AFC at Super Bowl 50? Answer:<|eot_id|>"), std::string::npos)
      << full;
  EXPECT_EQ(label_text(t, s), "Denver Broncos<|eot_id|>");
}

TEST(Datasets, SquadFullSubsetLoads) {
  REQUIRE_TOK("qwen3");
  auto ds = load("dataset: {_target_: squad, path_or_dataset: " + fixture("squad_dev_subset.json") + "}", tok_dir("qwen3"));
  EXPECT_EQ(ds->size(), 30u);
  for (size_t i = 0; i < ds->size(); ++i) EXPECT_GT(count_label_tokens(ds->get(i)), 0) << i;
}

TEST(Datasets, ColumnMappedAlpacaWithoutTemplate) {
  REQUIRE_TOK("llama3_1");
  std::string dir = no_template_copy("llama3_1");
  auto t = tok::Tokenizer::from_dir(dir);
  const std::string base = "dataset: {_target_: column_mapped, path_or_dataset: " + fixture("alpaca_small.json") +
                           ", column_mapping: {context: input, question: instruction, answer: output}";
  auto ds = load(base + "}", dir);
  ASSERT_EQ(ds->size(), 4u);
  // AutoModel: prompt = " ".join([context, question, ""]); loss on the answer + eos.
  EXPECT_EQ(t.decode(ds->get(1).input_ids), "<|begin_of_text|>3 and 4 Add the numbers. The sum is 7.<|eot_id|>");
  EXPECT_EQ(label_text(t, ds->get(1)), " The sum is 7.<|eot_id|>");
  auto all = load(base + ", answer_only_loss_mask: false}", dir);
  EXPECT_EQ(count_label_tokens(all->get(1)), static_cast<int64_t>(all->get(1).input_ids.size()) - 1);
}

TEST(Datasets, ColumnMappedAlpacaChatTemplate) {
  REQUIRE_TOK("llama3_1");
  auto t = tok::Tokenizer::from_dir(tok_dir("llama3_1"));
  auto ds = load("dataset: {_target_: nemo_automodel.components.datasets.llm.column_mapped_text_instruction_dataset."
                 "ColumnMappedTextInstructionDataset, path_or_dataset: " +
                     fixture("alpaca_small.json") + ", column_mapping: {context: input, question: instruction, answer: output}}",
                 tok_dir("llama3_1"));
  const Sample& s = ds->get(2);
  std::string full = t.decode(s.input_ids);
  EXPECT_NE(full.find("<|start_header_id|>system<|end_header_id|>"), std::string::npos);
  EXPECT_NE(full.find("hot<|eot_id|>"), std::string::npos) << full;
  EXPECT_EQ(label_text(t, s), "cold<|eot_id|>");
}

TEST(Datasets, ColumnMappedGsm8kStyleAndBadRow) {
  REQUIRE_TOK("llama3_1");
  auto p = write_tmp("am_gsm.jsonl",
                     "{\"question\": \"What is 2+3?\", \"answer\": \"2+3=5\\n#### 5\"}\n{\"question\": \"q\", \"oops\": 1}\n");
  auto yaml = "dataset: {_target_: column_mapped, path_or_dataset: " + p + ", column_mapping: {question: question, answer: answer}";
  try {
    load(yaml + "}", tok_dir("llama3_1"));
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("am_gsm.jsonl:2:"), std::string::npos) << e.what();
  }
  auto ds = load(yaml + ", limit_dataset_samples: 1}", tok_dir("llama3_1"));
  ASSERT_EQ(ds->size(), 1u);
  auto t = tok::Tokenizer::from_dir(tok_dir("llama3_1"));
  EXPECT_EQ(label_text(t, ds->get(0)), "2+3=5\n#### 5<|eot_id|>");
}

TEST(Datasets, LimitDatasetSamples) {
  REQUIRE_TOK("llama3_1");
  auto ds = load("dataset: {_target_: chat, path_or_dataset: " + fixture("chat_small.jsonl") + ", limit_dataset_samples: 2}",
                 tok_dir("llama3_1"));
  EXPECT_EQ(ds->size(), 2u);
  auto sq = load("dataset: {_target_: squad, path_or_dataset: " + fixture("squad_dev_subset.json") + ", limit_dataset_samples: 7}",
                 tok_dir("llama3_1"));
  EXPECT_EQ(sq->size(), 7u);
}

TEST(Datasets, SeqLengthTruncatesOrDrops) {
  REQUIRE_TOK("llama3_1");
  const std::string base = "dataset: {_target_: chat, path_or_dataset: " + fixture("chat_small.jsonl") + ", seq_length: 30";
  auto full = load("dataset: {_target_: chat, path_or_dataset: " + fixture("chat_small.jsonl") + "}", tok_dir("llama3_1"));
  int64_t longer = 0;
  for (size_t i = 0; i < full->size(); ++i) longer += full->get(i).input_ids.size() > 30;
  ASSERT_GT(longer, 0);
  ASSERT_LT(longer, 3);
  auto tr = load(base + "}", tok_dir("llama3_1"));
  ASSERT_EQ(tr->size(), 3u);
  for (size_t i = 0; i < tr->size(); ++i) {
    EXPECT_LE(tr->get(i).input_ids.size(), 30u);
    EXPECT_EQ(tr->get(i).labels.size(), tr->get(i).input_ids.size());
  }
  auto dr = load(base + ", drop_long_samples: true}", tok_dir("llama3_1"));
  EXPECT_EQ(static_cast<int64_t>(dr->size()), 3 - longer);
}

TEST(Datasets, VocabMismatchIsDataError) {
  REQUIRE_TOK("llama3_1");
  EXPECT_THROW(load("dataset: {_target_: chat, path_or_dataset: " + fixture("chat_small.jsonl") + "}", tok_dir("llama3_1"), 300),
               DataError);
}

TEST(Packing, CollateRestartsPositionsAndMasksBoundaries) {
  Sample a{{1, 2, 3}, {1, 2, 3}, {}}, b{{4, 5}, {4, 5}, {}}, c{{6, 7, 8, 9}, {-100, 7, 8, 9}, {}};
  auto rows = pack({&a, &b, &c}, 6);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].seq_lens, (std::vector<int32_t>{3, 2}));
  EXPECT_EQ(rows[1].seq_lens, (std::vector<int32_t>{4}));
  Batch bt = collate({&rows[0], &rows[1]});
  ASSERT_EQ(bt.T, 5);
  const int32_t* pos = bt.positions.data<int32_t>();
  const int32_t* seg = bt.segment_ids.data<int32_t>();
  const int32_t* tg = bt.targets.data<int32_t>();
  EXPECT_EQ(std::vector<int32_t>(pos, pos + 5), (std::vector<int32_t>{0, 1, 2, 0, 1}));
  EXPECT_EQ(std::vector<int32_t>(seg, seg + 10), (std::vector<int32_t>{0, 0, 0, 1, 1, 0, 0, 0, 0, -1}));
  EXPECT_EQ(std::vector<int32_t>(tg, tg + 5), (std::vector<int32_t>{2, 3, -100, 5, -100}));
  EXPECT_EQ(bt.num_label_tokens, 3 + 3);
  EXPECT_EQ(count_label_tokens(rows[0]) + count_label_tokens(rows[1]), 6);
}

TEST(Packing, PackedBatchMatchesSamplesOneByOne) {
  const fs::path dir = fs::path(src_dir()) / "tests/fixtures/golden/llama/model";
  auto cfg = io::load_model_config((dir / "config.json").string());
  auto model = build_model(cfg);
  load_hf_weights(*model, dir.string());
  std::mt19937 rng(7);
  std::vector<Sample> samples;
  for (int len : {5, 9, 3, 12, 7, 4, 10}) {
    Sample s;
    for (int t = 0; t < len; ++t) {
      int32_t id = static_cast<int32_t>(rng() % static_cast<uint32_t>(cfg.vocab_size));
      s.input_ids.push_back(id);
      s.labels.push_back(t < 2 ? -100 : id);  // a prompt of two tokens without loss
    }
    samples.push_back(s);
  }
  double ref = 0.0;
  int64_t ref_n = 0;
  for (auto& s : samples) {
    Batch b = collate({&s});
    ref += model->forward_loss(b);
    ref_n += b.num_label_tokens;
  }
  std::vector<const Sample*> ptrs;
  for (auto& s : samples) ptrs.push_back(&s);
  auto rows = pack(ptrs, 16);
  ASSERT_GT(rows.size(), 1u);
  ASSERT_LT(rows.size(), samples.size());
  std::vector<const Sample*> rp;
  for (auto& r : rows) rp.push_back(&r);
  Batch pb = collate(rp);
  EXPECT_EQ(pb.num_label_tokens, ref_n);
  double got = model->forward_loss(pb);
  EXPECT_NEAR(got, ref, 1e-4 * std::max(1.0, std::abs(ref)));
}

// End to end: one training step over the same samples, packed into rows or one per row, has the same loss
// and gradient norm (a packed row counts as one sample for the batch sizes).
TEST(Packing, TrainerStepSameLossPackedOrNot) {
  const fs::path g = fs::path(src_dir()) / "tests/fixtures/golden/llama";
  auto run = [&](int64_t pack, int64_t gbs) {
    Recipe r = Recipe::load((g / "recipe.yaml").string(),
                            {"checkpoint.enabled=false", "step_scheduler.max_steps=1", "clip_grad_norm.max_norm=null",
                             "step_scheduler.global_batch_size=" + std::to_string(gbs),
                             "step_scheduler.local_batch_size=" + std::to_string(gbs),
                             "packed_sequence.packed_sequence_size=" + std::to_string(pack)});
    return Trainer(r, {.quiet = true}).train();
  };
  // Every sample of data.jsonl in one step, either way.
  std::ifstream f(g / "data.jsonl");
  int64_t n = 0, max_len = 0;
  for (std::string l; std::getline(f, l);)
    if (!l.empty()) {
      ++n;
      max_len = std::max<int64_t>(max_len, static_cast<int64_t>(nlohmann::json::parse(l)["input_ids"].size()));
    }
  auto plain = run(0, n);
  auto packed = run(2 * max_len, n);
  ASSERT_EQ(plain.size(), 1u);
  ASSERT_EQ(packed.size(), 1u);
  EXPECT_EQ(plain[0].num_label_tokens, packed[0].num_label_tokens);
  EXPECT_NEAR(plain[0].loss, packed[0].loss, 1e-5);
  EXPECT_NEAR(plain[0].grad_norm, packed[0].grad_norm, 1e-4 * std::max(1.0, plain[0].grad_norm));
  EXPECT_LT(packed[0].padded_tokens, plain[0].padded_tokens + 1);
}

TEST(Datasets, ChatToolsReachTheTemplate) {
  REQUIRE_TOK("qwen3");
  auto p = write_tmp("am_chat_tools.jsonl",
                     "{\"messages\": [{\"role\": \"user\", \"content\": \"Weather in Oslo?\"}, {\"role\": \"assistant\", "
                     "\"content\": \"Let me check.\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": "
                     "\"get_weather\", \"description\": \"Current weather\", \"parameters\": {\"type\": \"object\", "
                     "\"properties\": {\"city\": {\"type\": \"string\"}}}}}]}\n");
  auto ds = load("dataset: {_target_: chat, path_or_dataset: " + p + "}", tok_dir("qwen3"));
  auto t = tok::Tokenizer::from_dir(tok_dir("qwen3"));
  std::string full = t.decode(ds->get(0).input_ids);
  EXPECT_NE(full.find("get_weather"), std::string::npos) << full;
  std::string lab = label_text(t, ds->get(0));
  EXPECT_NE(lab.find("Let me check.<|im_end|>"), std::string::npos) << lab;
  EXPECT_EQ(lab.find("get_weather"), std::string::npos) << lab;
}

TEST(Datasets, ChatTemplateOverride) {
  REQUIRE_TOK("llama3_1");
  std::string dir = no_template_copy("llama3_1");
  auto tmpl = write_tmp("am_simple.jinja",
                        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == "
                        "'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}");
  auto ds = load("dataset: {_target_: chat, path_or_dataset: " + fixture("chat_small.jsonl") + ", chat_template: " + tmpl + "}", dir);
  auto t = tok::Tokenizer::from_dir(dir);
  // transformers renders with trim_blocks: the newline after {% endif %} is dropped.
  EXPECT_EQ(t.decode(ds->get(2).input_ids), "<|begin_of_text|><user>Say yes.<assistant>Yes.<|eot_id|>");
  EXPECT_EQ(label_text(t, ds->get(2)), "Yes.<|eot_id|>");
}
