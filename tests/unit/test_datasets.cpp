// Text datasets (chat, squad, column_mapped, hellaswag), streaming readers, parallel tokenization, length
// limits and sequence packing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/dataset.h"
#include "data/text_common.h"
#include "io/model_config.h"
#include "models/hf_weights.h"
#include "tokenizer/tokenizer.h"
#include "config/recipe.h"
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

std::unique_ptr<Dataset> load(const std::string& yaml, const std::string& tokdir, int64_t vocab = 0, int threads = 0) {
  Recipe r = Recipe::from_string(yaml, "test.yaml");
  DatasetContext ctx;
  ctx.vocab_size = vocab;
  ctx.tokenizer_dir = tokdir;
  ctx.num_threads = threads;
  return make_dataset(r, "dataset", ctx);
}

// The DataError message of loading `yaml` ("" when it loads).
std::string load_error(const std::string& yaml, const std::string& tokdir, int threads = 0) {
  try {
    load(yaml, tokdir, 0, threads);
  } catch (const DataError& e) {
    return e.what();
  }
  return "";
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

// Rows that are each one sample without padding need no segment mask: collate says so (Batch::one_segment_rows),
// the decoder then gives attention none, and the loss is the one computed with the (all-zero) mask.
// Rows that are one sample each, right-padded or not, need no segment mask in causal attention: a real token's
// query never reaches a padding key (padding comes after it), and padding rows get zero gradient (their targets are
// -100), so loss and every gradient are bit-for-bit those of the masked run. Packed rows need the mask.
TEST(Collate, OneSegmentRowsWithoutPackingNeedNoMask) {
  const fs::path dir = fs::path(src_dir()) / "tests/fixtures/golden/llama/model";
  auto cfg = io::load_model_config((dir / "config.json").string());
  std::mt19937 rng(11);
  auto sample = [&](int len) {
    Sample s;
    for (int t = 0; t < len; ++t) {
      const int32_t id = static_cast<int32_t>(rng() % static_cast<uint32_t>(cfg.vocab_size));
      s.input_ids.push_back(id);
      s.labels.push_back(t < 2 ? -100 : id);
    }
    return s;
  };
  const Sample a = sample(9), b = sample(9), c = sample(6);
  Sample packed = sample(9);
  packed.seq_lens = {4, 5};
  Sample whole = sample(9);
  whole.seq_lens = {9};
  CollateOptions pad;
  pad.pad_to = 12;
  EXPECT_TRUE(collate({&a, &b}).one_segment_rows);
  EXPECT_TRUE(collate({&a, &whole}).one_segment_rows);
  EXPECT_TRUE(collate({&a, &c}).one_segment_rows) << "c is right-padded";
  EXPECT_TRUE(collate({&a, &b}, pad).one_segment_rows) << "padded to 12";
  EXPECT_FALSE(collate({&a, &packed}).one_segment_rows) << "a packed row";
  EXPECT_FALSE(collate({&packed}, pad).one_segment_rows) << "a packed row, padded";
  for (const Batch& base : {collate({&a, &b}), collate({&a, &c}, pad)}) {
    std::vector<std::unique_ptr<CausalLM>> m;
    for (int i = 0; i < 2; ++i) {
      m.push_back(build_model(cfg));
      load_hf_weights(*m.back(), dir.string());
      m.back()->params().zero_grad();
    }
    Batch masked = base;
    masked.one_segment_rows = false;
    ForwardOptions fo;
    const double without_mask = m[0]->forward_backward(base, 1.0f, fo);
    const double with_mask = m[1]->forward_backward(masked, 1.0f, fo);
    EXPECT_EQ(without_mask, with_mask) << "T " << base.T;
    for (Param& p : m[0]->params().all()) {
      const Tensor& g0 = p.grad;
      const Tensor& g1 = m[1]->params().get(p.name).grad;
      ASSERT_EQ(g0.numel(), g1.numel());
      EXPECT_EQ(std::memcmp(g0.raw(), g1.raw(), static_cast<size_t>(g0.numel()) * 4), 0) << p.name << " T " << base.T;
    }
  }
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

// ---- hellaswag (AutoModel's HellaSwag: ctx, then endings[label]; loss on the ending) ----

namespace {
const char* kHellaJsonl =
    "{\"ind\": 4, \"activity_label\": \"Removing ice from car\", \"ctx_a\": \"Then, the man writes over the snow "
    "covering the window of a car, and a woman wearing winter clothes smiles.\", \"ctx_b\": \"then\", \"ctx\": \"Then, "
    "the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles. then\", "
    "\"endings\": [\", the man adds wax to the windshield and cuts it.\", \", a person board a ski lift, while two men "
    "supporting the head of the person wearing winter clothes snow as the we girls sled.\", \", the man puts on a "
    "christmas coat, knitted with netting.\", \", the man continues removing the snow on his car.\"], \"source_id\": "
    "\"activitynet~v_-1IBHYS3L-Y\", \"split\": \"train\", \"split_type\": \"indomain\", \"label\": 3}\n"
    "\n"
    "{\"activity_label\": \"Roof shingle removal\", \"ctx_a\": \"A man is sitting on a roof.\", \"ctx_b\": \"he\", "
    "\"endings\": [\"is using wrap to wrap a pair of skis.\", \"is ripping level tiles off.\", \"is holding a rubik's "
    "cube.\", \"starts pulling up roofing on a roof.\"], \"label\": \"3\"}\n";

// The same two tasks in the 6-lines-per-task text layout ("activity_label: ctx", label, 4 endings).
const char* kHellaText =
    "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman wearing "
    "winter clothes smiles. then\n3\n, the man adds wax to the windshield and cuts it.\n, a person board a ski lift, "
    "while two men supporting the head of the person wearing winter clothes snow as the we girls sled.\n, the man puts "
    "on a christmas coat, knitted with netting.\n, the man continues removing the snow on his car.\n"
    "Roof shingle removal: A man is sitting on a roof. he\n3\nis using wrap to wrap a pair of skis.\nis ripping level "
    "tiles off.\nis holding a rubik's cube.\nstarts pulling up roofing on a roof.\n";

// AutoModel's SFTSingleTurnPreprocessor for one example: tokenizer(ctx) minus a trailing special token,
// tokenizer(target) minus a leading one, concatenated; labels (aligned, -100 on the context) on the target.
Sample automodel_hellaswag(const tok::Tokenizer& t, const std::string& ctx, const std::string& ending) {
  auto special = [&](int32_t id) { return t.is_special_id(id) || id == t.bos_id() || id == t.eos_id(); };
  auto c = t.encode(ctx, true), e = t.encode(ending, true);
  if (!c.empty() && special(c.back())) c.pop_back();
  if (!e.empty() && special(e.front())) e.erase(e.begin());
  Sample s;
  s.input_ids = c;
  s.input_ids.insert(s.input_ids.end(), e.begin(), e.end());
  s.labels.assign(c.size(), -100);
  s.labels.insert(s.labels.end(), e.begin(), e.end());
  return s;
}
}  // namespace

TEST(Datasets, HellaSwagJsonlAsAutoModel) {
  REQUIRE_TOK("llama3_1");
  auto t = tok::Tokenizer::from_dir(tok_dir("llama3_1"));
  auto p = write_tmp("am_hella.jsonl", kHellaJsonl);
  auto ds = load("dataset: {_target_: nemo_automodel.components.datasets.llm.hellaswag.HellaSwag, path_or_dataset: " + p +
                     ", split: validation}",
                 tok_dir("llama3_1"));
  ASSERT_EQ(ds->size(), 2u);
  const std::string ctx0 = "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles. then";
  const Sample& s = ds->get(0);
  Sample ref = automodel_hellaswag(t, ctx0, ", the man continues removing the snow on his car.");
  EXPECT_EQ(s.input_ids, ref.input_ids);
  EXPECT_EQ(s.labels, ref.labels);
  // BOS once, at the start; the ending's own BOS is dropped; no eos (Llama 3 does not add one).
  EXPECT_EQ(s.input_ids[0], *t.bos_id());
  EXPECT_EQ(std::count(s.input_ids.begin(), s.input_ids.end(), *t.bos_id()), 1);
  EXPECT_EQ(t.decode(s.input_ids), "<|begin_of_text|>" + ctx0 + ", the man continues removing the snow on his car.");
  EXPECT_EQ(label_text(t, s), ", the man continues removing the snow on his car.");
  // ctx built from ctx_a + " " + ctx_b when absent; a string label; the ending is tokenized on its own
  // (byte-level BPE: no space is inserted between context and ending, exactly as AutoModel).
  EXPECT_EQ(label_text(t, ds->get(1)), "starts pulling up roofing on a roof.");
  EXPECT_EQ(t.decode(ds->get(1).input_ids), "<|begin_of_text|>A man is sitting on a roof. hestarts pulling up roofing on a roof.");
  auto lim = load("dataset: {_target_: hellaswag, path_or_dataset: " + p + ", num_samples_limit: 1}", tok_dir("llama3_1"));
  EXPECT_EQ(lim->size(), 1u);
}

TEST(Datasets, HellaSwagSentencePieceEndingKeepsItsSpace) {
  REQUIRE_TOK("llama2");
  auto t = tok::Tokenizer::from_dir(tok_dir("llama2"));
  auto ds = load("dataset: {_target_: hellaswag, path_or_dataset: " + write_tmp("am_hella2.jsonl", kHellaJsonl) + "}", tok_dir("llama2"));
  const Sample& s = ds->get(1);
  Sample ref = automodel_hellaswag(t, "A man is sitting on a roof. he", "starts pulling up roofing on a roof.");
  EXPECT_EQ(s.input_ids, ref.input_ids);
  EXPECT_EQ(s.labels, ref.labels);
  // SentencePiece prefixes the separately tokenized ending with "▁": the text reads "he starts".
  EXPECT_EQ(t.decode(s.input_ids), "<s> A man is sitting on a roof. he starts pulling up roofing on a roof.");
}

TEST(Datasets, HellaSwagTextLayoutPlainAndBz2) {
  REQUIRE_TOK("llama3_1");
  auto json = load("dataset: {_target_: hellaswag, path_or_dataset: " + write_tmp("am_hella3.jsonl", kHellaJsonl) + "}",
                   tok_dir("llama3_1"));
  auto txt_path = write_tmp("am_hella_val.txt", kHellaText);
  auto txt = load("dataset: {_target_: hellaswag, path_or_dataset: " + txt_path + "}", tok_dir("llama3_1"));
  ASSERT_EQ(txt->size(), 2u);
  for (size_t i = 0; i < 2; ++i) {  // the activity label is dropped: the prompt is ctx, as from the JSONL
    EXPECT_EQ(txt->get(i).input_ids, json->get(i).input_ids) << i;
    EXPECT_EQ(txt->get(i).labels, json->get(i).labels) << i;
  }
  // The shipped copy is bzip2-compressed: read through `bzip2 -dc`, streamed.
  fs::remove(txt_path + ".bz2");
  if (std::system(("bzip2 -k " + txt_path + " 2>/dev/null").c_str()) != 0) GTEST_SKIP() << "no bzip2 program";
  auto bz = load("dataset: {_target_: hellaswag, path_or_dataset: " + txt_path + ".bz2}", tok_dir("llama3_1"));
  ASSERT_EQ(bz->size(), 2u);
  EXPECT_EQ(bz->get(1).input_ids, json->get(1).input_ids);
  // A corrupt .bz2 is an IoError, not a silently short dataset.
  std::string corrupt = write_tmp("am_hella_bad.txt.bz2", "BZh91AY&SY garbage");
  EXPECT_THROW(load("dataset: {_target_: hellaswag, path_or_dataset: " + corrupt + "}", tok_dir("llama3_1")), IoError);
}

TEST(Datasets, HellaSwagBadRowsNameFileAndLine) {
  REQUIRE_TOK("llama3_1");
  const std::string tk = tok_dir("llama3_1");
  auto yaml = [](const std::string& p) { return "dataset: {_target_: hellaswag, path_or_dataset: " + p + "}"; };
  std::string good = "{\"ctx\": \"a\", \"endings\": [\"b\", \"c\"], \"label\": 1}\n";
  EXPECT_NE(load_error(yaml(write_tmp("am_hb1.jsonl", good + good + "{\"ctx\": \"a\", \"endings\": [\"b\"], \"label\": 1}\n")), tk)
                .find("am_hb1.jsonl:3: \"label\" must be an index"),
            std::string::npos);
  EXPECT_NE(load_error(yaml(write_tmp("am_hb2.jsonl", good + "{\"ctx\": \"a\", \"endings\": [\"b\"], \"label\": \"\"}\n")), tk)
                .find("am_hb2.jsonl:2: no \"label\""),
            std::string::npos);
  EXPECT_NE(load_error(yaml(write_tmp("am_hb3.jsonl", good + "\n{\"ctx\": \"a\", \"endings\"\n")), tk).find("am_hb3.jsonl:3: malformed"),
            std::string::npos);
  std::string task = "Label: ctx\n1\ne0\ne1\ne2\ne3\n";
  EXPECT_NE(load_error(yaml(write_tmp("am_hb4.txt", task + "Label: ctx\nx\ne0\ne1\ne2\ne3\n")), tk).find("am_hb4.txt:8: expected the label"),
            std::string::npos);
  EXPECT_NE(load_error(yaml(write_tmp("am_hb5.txt", task + task + "Label: ctx\n2\ne0\n")), tk).find("am_hb5.txt:13: incomplete task"),
            std::string::npos);
}

// ---- streaming and threads ----

TEST(Datasets, ParallelSamplesKeepOrderAndFirstError) {
  auto fn = [](size_t i) {
    if (i == 613 || i == 1500 || i == 2900) throw DataError("row " + std::to_string(i));
    return Sample{{static_cast<int32_t>(i)}, {static_cast<int32_t>(i)}, {}};
  };
  for (int th : {1, 2, 3, 8}) {
    auto ok = parallel_samples(600, th, fn);
    ASSERT_EQ(ok.size(), 600u);
    for (size_t i = 0; i < ok.size(); ++i) ASSERT_EQ(ok[i].input_ids[0], static_cast<int32_t>(i));
    try {
      parallel_samples(3000, th, fn);
      FAIL() << "expected DataError";
    } catch (const DataError& e) {
      EXPECT_STREQ(e.what(), "row 613") << th;  // the lowest failing index, as a sequential loop
    }
  }
}

// Every text dataset gives the same samples on 1 thread and on several.
TEST(Datasets, OneThreadEqualsManyThreads) {
  REQUIRE_TOK("llama3_1");
  REQUIRE_TOK("qwen3");
  // Both loads must tokenise: the tokenised-dataset cache would give the second one the first one's samples.
  struct NoCache {
    std::string old = std::getenv("AM_DATASET_CACHE") ? std::getenv("AM_DATASET_CACHE") : "";
    NoCache() { ::setenv("AM_DATASET_CACHE", "0", 1); }
    ~NoCache() { old.empty() ? ::unsetenv("AM_DATASET_CACHE") : ::setenv("AM_DATASET_CACHE", old.c_str(), 1); }
  } no_cache;
  std::string chat, sq, cm, hs;
  for (int i = 0; i < 700; ++i) {
    std::string n = std::to_string(i), m = std::to_string(i * 7 % 13);
    chat += "{\"messages\": [{\"role\": \"user\", \"content\": \"What is " + n + " plus " + m + "?\"}, {\"role\": \"assistant\", "
            "\"content\": \"" + n + " + " + m + " = " + std::to_string(i + i * 7 % 13) + ".\"}" +
            (i % 3 ? ", {\"role\": \"user\", \"content\": \"Thanks " + n + "!\"}, {\"role\": \"assistant\", \"content\": \"You're welcome.\"}" : "") +
            "]}\n";
    sq += "{\"context\": \"Item " + n + " costs " + m + " euros.\", \"question\": \"How much is item " + n +
          "?\", \"answers\": {\"text\": [\"" + m + " euros\"]}}\n";
    cm += "{\"instruction\": \"Repeat " + n + "\", \"input\": \"" + (i % 2 ? m : "") + "\", \"output\": \"" + n + " " + n + "\"}\n";
    hs += "{\"ctx\": \"Person " + n + " walks to the\", \"endings\": [\" door.\", \" car " + m + ".\", \" roof.\", \" park.\"], \"label\": " +
          std::to_string(i % 4) + "}\n";
  }
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{_target_: chat, path_or_dataset: " + write_tmp("am_par_chat.jsonl", chat) + "}", "llama3_1"},
      {"{_target_: chat, path_or_dataset: " + write_tmp("am_par_chat.jsonl", chat) + "}", "qwen3"},
      {"{_target_: squad, path_or_dataset: " + write_tmp("am_par_squad.jsonl", sq) + "}", "qwen3"},
      {"{_target_: squad, path_or_dataset: " + fixture("squad_dev_subset.json") + "}", "llama3_1"},
      {"{_target_: column_mapped, path_or_dataset: " + write_tmp("am_par_cm.jsonl", cm) +
           ", column_mapping: {context: input, question: instruction, answer: output}}", "llama3_1"},
      {"{_target_: column_mapped, path_or_dataset: " + write_tmp("am_par_cm.jsonl", cm) +
           ", column_mapping: {context: input, question: instruction, answer: output}}", "notmpl"},
      {"{_target_: hellaswag, path_or_dataset: " + write_tmp("am_par_hs.jsonl", hs) + "}", "llama3_1"},
  };
  const std::string notmpl = no_template_copy("llama3_1");
  for (const auto& [section, tk] : cases) {
    const std::string dir = tk == "notmpl" ? notmpl : tok_dir(tk);
    auto one = load("dataset: " + section, dir, 0, 1);
    auto many = load("dataset: " + section, dir, 0, 5);
    ASSERT_EQ(one->size(), many->size()) << section;
    ASSERT_GT(one->size(), 20u) << section;
    for (size_t i = 0; i < one->size(); ++i) {
      ASSERT_EQ(one->get(i).input_ids, many->get(i).input_ids) << section << " sample " << i;
      ASSERT_EQ(one->get(i).labels, many->get(i).labels) << section << " sample " << i;
    }
  }
}

// Rows are read line by line in chunks; a bad line far into the file (past the first chunk) is still
// reported as file:line, and an earlier bad row wins over a later malformed line, on any thread count.
TEST(Datasets, StreamedBadLineNamesFileAndLine) {
  REQUIRE_TOK("llama3_1");
  std::string body;
  for (int i = 1; i <= 2999; ++i)
    body += i % 500 == 0 ? "\n" : "{\"question\": \"q" + std::to_string(i) + "\", \"answer\": \"a\"}\n";
  const std::string bad_json = body + "{\"question\": \"q\", \"answer\": \n" + "{\"question\": \"q\", \"answer\": \"a\"}\n";
  const std::string cmap = ", column_mapping: {question: question, answer: answer}}";
  for (int th : {1, 4}) {
    auto p = write_tmp("am_stream_bad.jsonl", bad_json);
    std::string err = load_error("dataset: {_target_: column_mapped, path_or_dataset: " + p + cmap, tok_dir("llama3_1"), th);
    EXPECT_NE(err.find("am_stream_bad.jsonl:3000: malformed JSON line"), std::string::npos) << err;
    // A row without the answer column on line 2100 comes before the malformed line 3000.
    std::string two = body;
    size_t pos = 0;
    for (int l = 1; l < 2100; ++l) pos = two.find('\n', pos) + 1;
    two.insert(pos, "{\"question\": \"no answer\"}\n");
    p = write_tmp("am_stream_bad2.jsonl", two + "{oops\n");
    err = load_error("dataset: {_target_: column_mapped, path_or_dataset: " + p + cmap, tok_dir("llama3_1"), th);
    EXPECT_NE(err.find("am_stream_bad2.jsonl:2100: missing answer column"), std::string::npos) << err;
    // limit_dataset_samples stops reading before the bad line.
    EXPECT_EQ(load("dataset: {_target_: column_mapped, path_or_dataset: " + p + ", limit_dataset_samples: 50" + cmap,
                   tok_dir("llama3_1"), 0, th)->size(), 50u);
  }
  // tokenized_jsonl reads line by line too.
  std::string tj;
  for (int i = 0; i < 40; ++i) tj += "{\"input_ids\": [1, 2, 3]}\n";
  auto p = write_tmp("am_stream_tok.jsonl", tj + "{\"input_ids\": [1, \n");
  EXPECT_NE(load_error("dataset: {_target_: tokenized_jsonl, path_or_dataset: " + p + "}", ""), "");
  EXPECT_NE(load_error("dataset: {_target_: tokenized_jsonl, path_or_dataset: " + p + "}", "").find("am_stream_tok.jsonl:41:"),
            std::string::npos);
}
