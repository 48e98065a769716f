// The recipe key table (issue 11): AutoModel's keys are accepted (honoured or warned about), typos fail with
// the nearest key, every unknown key is reported at once in file order, AutoModel's alternative spellings are
// normalised, and docs/recipes.md's table is the generated one.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "config/recipe.h"
#include "config/schema.h"
#include "core/error.h"
#include "train/checkpoint.h"
#include "train/model_source.h"
#include "train/trainer.h"

using namespace am;
namespace fs = std::filesystem;

namespace {

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    Recipe::from_string(yaml, "r.yaml", overrides);
  } catch (const RecipeError& e) {
    return e.what();
  } catch (const UsageError& e) {
    return std::string("usage: ") + e.what();
  }
  return "";
}

bool has_warning(const Recipe& r, const std::string& needle) {
  for (auto& w : r.warnings())
    if (w.find(needle) != std::string::npos) return true;
  return false;
}

// A recipe in the shape of AutoModel's llama3_2_1b_squad / qwen3 MoE recipes (written here, key for key the
// forms those recipes use), with settings we do not have.
const char* kAutoModelStyle = R"(
recipe: TrainFinetuneRecipeForNextTokenPrediction
step_scheduler:
  global_batch_size: 32
  local_batch_size: 4
  ckpt_every_steps: 1000
  val_every_steps: 10
  num_epochs: 1
  gc_every_steps: 50
dist_env:
  backend: nccl
  timeout_minutes: 1
rng:
  _target_: nemo_automodel.components.training.rng.StatefulRNG
  seed: 1111
  ranked: true
model:
  _target_: nemo_automodel.NeMoAutoModelForCausalLM.from_config
  config:
    _target_: transformers.AutoConfig.from_pretrained
    pretrained_model_name_or_path: Qwen/Qwen3-30B-A3B
    num_hidden_layers: 2
    trust_remote_code: true
  backend:
    _target_: nemo_automodel.components.models.common.BackendConfig
    attn: te
    linear: te
    rms_norm: te
    experts: torch_mm
    dispatcher: deepep
    fake_balanced_gate: false
    enable_hf_state_dict_adapter: true
checkpoint:
  enabled: true
  checkpoint_dir: checkpoints/
  model_save_format: safetensors
  save_consolidated: true
  dequantize_base_checkpoint: false
distributed:
  strategy: fsdp2
  dp_size: none
  tp_size: 2
  cp_size: 1
  pp_size: 1
  ep_size: 1
  sequence_parallel: false
  activation_checkpointing: true
  pipeline:
    pp_schedule: interleaved1f1b
    pp_microbatch_size: 1
  moe:
    reshard_after_forward: false
loss_fn:
  _target_: nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy
  fp32_upcast: true
dataset:
  _target_: nemo_automodel.components.datasets.llm.squad.make_squad_dataset
  dataset_name: rajpurkar/squad
  split: train
  padding: do_not_pad
  seq_length: 512
  tokenizer:
    _target_: transformers.AutoTokenizer.from_pretrained
    pretrained_model_name_or_path: /tmp/tok
packed_sequence:
  packed_sequence_size: 0
dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  collate_fn:
    _target_: nemo_automodel.components.datasets.utils.default_collater
    pad_seq_len_divisible: 64
  shuffle: false
  num_workers: 4
validation_dataset:
  _target_: nemo_automodel.components.datasets.llm.squad.make_squad_dataset
  dataset_name: rajpurkar/squad
  split: validation
  limit_dataset_samples: 64
validation_dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  collate_fn: nemo_automodel.components.datasets.utils.default_collater
  batch_size: 8
optimizer:
  _target_: torch.optim.Adam
  betas: [0.9, 0.999]
  eps: 1e-8
  lr: 1.0e-5
  weight_decay: 0
  foreach: false
compile:
  enabled: true
  mode: max-autotune
fp8:
  enabled: false
  recipe_name: tensorwise
wandb:
  project: p
  entity: e
  name: n
ci:
  recipe_owner: someone
  time: "00:30:00"
_anchors:
  x: &x 1
)";

}  // namespace

TEST(RecipeSchema, AutoModelRecipeIsAcceptedWithOneLinePerChange) {
  Recipe r = Recipe::from_string(kAutoModelStyle, "am.yaml");
  // Settings we do not have: one line each, naming the key, its value and what runs instead.
  EXPECT_TRUE(has_warning(r, "key 'distributed.tp_size' (2): tensor parallelism is not supported; the GPUs run data parallel"));
  EXPECT_TRUE(has_warning(r, "key 'model.backend.attn' (te)"));
  EXPECT_TRUE(has_warning(r, "key 'model.backend.dispatcher' (deepep)"));
  EXPECT_TRUE(has_warning(r, "key 'compile': torch.compile does not apply"));
  EXPECT_TRUE(has_warning(r, "key 'wandb': Weights & Biases logging is not supported"));
  // Disabled features, honoured keys and inert knobs say nothing.
  for (const char* quiet : {"'fp8'", "fp8.recipe_name", "num_workers", "gc_every_steps", "'ci", "dist_env", "rng.",
                            "experts", "fp32_upcast", "cp_size", "sequence_parallel", "wandb.project", "_anchors"})
    EXPECT_FALSE(has_warning(r, quiet)) << quiet;
  // One line per section for a warned section, not one per key below it.
  int wandb_lines = 0;
  for (auto& w : r.warnings()) wandb_lines += w.find("wandb") != std::string::npos;
  EXPECT_EQ(wandb_lines, 1);
  // Normalised forms.
  EXPECT_EQ(r.recipe_class(), "finetune");
  EXPECT_EQ(r.get_string("dataset.tokenizer", ""), "/tmp/tok");
  EXPECT_EQ(r.get_int("rng.seed", 0), 1111);
  EXPECT_FALSE(r.has("distributed.dp_size"));  // `none` is null, as AutoModel's loader reads it
}

TEST(RecipeSchema, TyposFailAllAtOnceInFileOrderWithSuggestions) {
  const std::string e = error_of(
      "step_scheduler:\n  global_batch_szie: 4\noptimzer:\n  lr: 1\ndataset:\n  _target_: squad\n"
      "  limit_dataset_sample: 3\nvalidation_dataset_extra:\n  spilt: train\nmodel:\n  backend:\n    atn: sdpa\n"
      "totally_unrelated_thing: 1\n");
  EXPECT_NE(e.find("6 problems"), std::string::npos) << e;
  const char* expected[] = {
      "r.yaml:2: key 'step_scheduler.global_batch_szie': unknown recipe key; did you mean 'step_scheduler.global_batch_size'?",
      "r.yaml:3: key 'optimzer': unknown recipe key; did you mean 'optimizer'?",
      "r.yaml:7: key 'dataset.limit_dataset_sample': unknown recipe key; did you mean 'dataset.limit_dataset_samples'?",
      "r.yaml:9: key 'validation_dataset_extra.spilt': unknown recipe key; did you mean 'validation_dataset_extra.split'?",
      "r.yaml:12: key 'model.backend.atn': unknown recipe key; did you mean 'model.backend.attn'?",
  };
  size_t at = 0;
  for (const char* x : expected) {
    const size_t p = e.find(x);
    ASSERT_NE(p, std::string::npos) << x << "\nin:\n" << e;
    EXPECT_GT(p, at) << "not in file order: " << x;
    at = p;
  }
  // Nothing close: no suggestion, still named.
  EXPECT_NE(e.find("key 'totally_unrelated_thing': unknown recipe key"), std::string::npos);
  EXPECT_EQ(e.find("unrelated_thing': unknown recipe key;"), std::string::npos);
  // One unknown key: a single line.
  const std::string one = error_of("optimizer:\n  lrr: 1\n");
  EXPECT_EQ(one, "r.yaml:2: key 'optimizer.lrr': unknown recipe key; did you mean 'optimizer.lr'? (the keys: docs/recipes.md)");
  // In an override.
  EXPECT_NE(error_of("seed: 1\n", {"optimizer.wieght_decay=0.1"})
                .find("command-line override --optimizer.wieght_decay: unknown recipe key; did you mean 'optimizer.weight_decay'?"),
            std::string::npos);
}

TEST(RecipeSchema, SectionErrorsPointAtTheSectionLine) {
  EXPECT_NE(error_of("seed: 1\n\noptimizer: 5\n").find("r.yaml:3: key 'optimizer': expected a mapping (section), got a number"),
            std::string::npos);
}

TEST(RecipeSchema, NearestKey) {
  EXPECT_EQ(config::nearest_key("optimizer.lrr"), "optimizer.lr");
  EXPECT_EQ(config::nearest_key("step_scheduler.max_step"), "step_scheduler.max_steps");
  EXPECT_EQ(config::nearest_key("validation_dataset.spilt"), "validation_dataset.split");
  EXPECT_EQ(config::nearest_key("peft.dmi"), "peft.dim");
  EXPECT_EQ(config::nearest_key("packed_sequence.packed_sequence_szie"), "packed_sequence.packed_sequence_size");
  EXPECT_EQ(config::nearest_key("zzzzzz"), "");
}

TEST(RecipeSchema, RecipeClasses) {
  EXPECT_EQ(Recipe::from_string("recipe: BenchmarkingRecipeForNextTokenPrediction\n", "r.yaml").recipe_class(), "benchmark");
  EXPECT_EQ(Recipe::from_string("recipe:\n  _target_: nemo_automodel.recipes.llm.train_ft.TrainFinetuneRecipeForNextTokenPrediction\n",
                                "r.yaml").recipe_class(), "finetune");
  EXPECT_NE(error_of("recipe: KnowledgeDistillationRecipeForNextTokenPrediction\n").find("knowledge distillation is not supported"),
            std::string::npos);
  EXPECT_NE(error_of("recipe: FinetuneRecipeForVLM\n").find("vision-language recipes are not supported"), std::string::npos);
  EXPECT_NE(error_of("recipe: SomethingElse\n").find("r.yaml:1: key 'recipe': 'SomethingElse' is not a recipe"), std::string::npos);
}

TEST(RecipeSchema, TokenizerMappingsAndAliases) {
  Recipe r = Recipe::from_string(
      "tokenizer:\n  _target_: nemo_automodel.NeMoAutoTokenizer.from_pretrained\n  pretrained_model_name_or_path: /t\n"
      "  add_bos_token: true\nparallelizer:\n  activation_checkpointing: true\ncheckpoint:\n  max_recent_checkpoints: 3\n",
      "r.yaml");
  EXPECT_EQ(r.get_string("model.tokenizer", ""), "/t");
  EXPECT_TRUE(r.get_bool("distributed.activation_checkpointing", false));
  EXPECT_EQ(r.get_int("checkpoint.keep_last_n", 0), 3);
  EXPECT_TRUE(has_warning(r, "tokenizer.add_bos_token"));
  EXPECT_NE(error_of("model:\n  tokenizer:\n    _target_: AutoTokenizer.from_pretrained\n").find("needs pretrained_model_name_or_path"),
            std::string::npos);
  EXPECT_NE(error_of("checkpoint:\n  keep_last_n: 2\n  max_recent_checkpoints: 3\n").find("say the same thing differently"),
            std::string::npos);
}

TEST(RecipeSchema, ValueDependentWarnings) {
  Recipe quiet = Recipe::from_string("distributed:\n  tp_size: 1\n  pp_size: null\nmodel:\n  backend:\n    attn: sdpa\n"
                                     "clip_grad_norm:\n  norm_type: 2.0\nloss_fn:\n  ignore_index: -100\n",
                                     "r.yaml");
  EXPECT_TRUE(quiet.warnings().empty()) << quiet.warnings()[0];
  Recipe loud = Recipe::from_string("distributed:\n  pp_size: 4\n  cp_size: 2\nclip_grad_norm:\n  norm_type: 1\n"
                                    "optimizer:\n  maximize: true\n",
                                    "r.yaml");
  EXPECT_TRUE(has_warning(loud, "key 'distributed.pp_size' (4): pipeline parallelism is not supported"));
  EXPECT_TRUE(has_warning(loud, "key 'distributed.cp_size' (2): context parallelism"));
  EXPECT_TRUE(has_warning(loud, "key 'clip_grad_norm.norm_type' (1): only the L2 norm"));
  EXPECT_TRUE(has_warning(loud, "optimizer.maximize"));
}

TEST(RecipeSchema, DistributedSizesWarnAndRunDataParallel) {
  // tp 2 on 4 ranks: accepted; AutoModel's derived dp_size (2) is accepted too; any other dp_size is not.
  Recipe r = Recipe::from_string("distributed:\n  tp_size: 2\n  dp_size: 2\nstep_scheduler:\n  global_batch_size: 8\n"
                                 "  local_batch_size: 2\n", "r.yaml");
  EXPECT_NO_THROW(check_distributed_recipe(r, 4, nullptr));
  // A dp_size written for another machine warns (log) and runs data parallel over the ranks there are.
  Recipe other = Recipe::from_string("distributed:\n  dp_size: 8\nstep_scheduler:\n  global_batch_size: 8\n  local_batch_size: 2\n",
                                     "r.yaml");
  EXPECT_NO_THROW(check_distributed_recipe(other, 4, nullptr));
  EXPECT_NO_THROW(check_distributed_recipe(Recipe::from_string("distributed:\n  strategy: megatron_fsdp\n", "r.yaml"), 1, nullptr));
  EXPECT_THROW(check_distributed_recipe(Recipe::from_string("distributed:\n  strategy: zero9\n", "r.yaml"), 1, nullptr),
               RecipeError);
}

TEST(RecipeSchema, BatchShapeAsAutoModelsLoaderReadsIt) {
  auto shape = [](const std::string& y) { return batch_shape(Recipe::from_string(y, "r.yaml")); };
  BatchShape a = shape("step_scheduler:\n  global_batch_size: 16\n  local_batch_size: 4\ndataloader:\n  batch_size: null\n");
  EXPECT_EQ(a.gbs, 16);
  EXPECT_EQ(a.lbs, 4);
  EXPECT_TRUE(a.note.empty());
  BatchShape b = shape("step_scheduler:\n  global_batch_size: 16\ndataloader:\n  batch_size: 2\n");
  EXPECT_EQ(b.gbs, 16);
  EXPECT_EQ(b.lbs, 2);
  BatchShape c = shape("step_scheduler:\n  global_batch_size: 16\n  local_batch_size: 4\ndataloader:\n  batch_size: 2\n"
                       "validation_dataloader:\n  batch_size: 8\n");
  EXPECT_EQ(c.lbs, 2);
  EXPECT_EQ(c.gbs, 8);  // 16 / 4 = 4 micro-batches of 2
  EXPECT_EQ(c.val_lbs, 8);
  EXPECT_NE(c.note.find("a step takes 4 of them (8 samples)"), std::string::npos) << c.note;
  BatchShape d = shape("step_scheduler:\n  global_batch_size: 12\ndataloader:\n  batch_size: null\n"
                       "dataset:\n  _target_: mock\n  batch_size: 3\n");
  EXPECT_EQ(d.lbs, 3);
}

TEST(RecipeSchema, ModelConfigMappingWithOverrides) {
  const fs::path dir = fs::temp_directory_path() / ("am_schema_cfg_" + std::to_string(::getpid()));
  fs::create_directories(dir / "m");
  std::ofstream(dir / "m" / "config.json") << R"({"model_type": "llama", "vocab_size": 300, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "torch_dtype": "float32"})";
  Recipe r = Recipe::from_string("model:\n  _target_: nemo_automodel.NeMoAutoModelForCausalLM.from_config\n  config:\n"
                                 "    _target_: transformers.AutoConfig.from_pretrained\n    pretrained_model_name_or_path: " +
                                     (dir / "m").string() + "\n    num_hidden_layers: 2\n    rope_theta: 5000.0\n"
                                     "    trust_remote_code: true\n  router_aux_loss_coef: 0.01\n",
                                 "r.yaml");
  ModelSource m = resolve_model_source(r);
  EXPECT_TRUE(m.weights_dir.empty());  // from_config: random init
  EXPECT_EQ(m.cfg.num_hidden_layers, 2);
  EXPECT_DOUBLE_EQ(m.cfg.rope.rope_theta, 5000.0);
  EXPECT_EQ(m.cfg.raw["num_hidden_layers"], 2);  // the exported config.json carries the overrides
  EXPECT_FALSE(m.cfg.raw.contains("trust_remote_code"));
  EXPECT_DOUBLE_EQ(m.cfg.raw["router_aux_loss_coef"].get<double>(), 0.01);
  EXPECT_EQ(m.tokenizer_dir, (dir / "m").string());  // AutoModel takes the tokenizer from the config's model
  // A model class that is not a causal LM is refused, naming the key.
  Recipe vlm = Recipe::from_string("model:\n  _target_: nemo_automodel.NeMoAutoModelForImageTextToText.from_pretrained\n"
                                   "  pretrained_model_name_or_path: /x\n", "r.yaml");
  try {
    resolve_model_source(vlm);
    ADD_FAILURE();
  } catch (const RecipeError& e) {
    EXPECT_NE(std::string(e.what()).find("key 'model._target_'"), std::string::npos);
  }
  fs::remove_all(dir);
}

TEST(RecipeSchema, KeepLastNPrunesOldestButNeverLatest) {
  const fs::path dir = fs::temp_directory_path() / ("am_schema_prune_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  for (int s : {2, 4, 6, 8}) fs::create_directories(dir / ("epoch_0_step_" + std::to_string(s)));
  fs::create_directories(dir / ".tmp_epoch_0_step_10");
  fs::create_directory_symlink("epoch_0_step_2", dir / "LATEST");  // e.g. a resumed run pointed back
  auto removed = prune_checkpoints(dir.string(), 2);
  EXPECT_EQ(removed.size(), 1u);
  EXPECT_TRUE(fs::exists(dir / "epoch_0_step_2"));  // LATEST's target stays
  EXPECT_FALSE(fs::exists(dir / "epoch_0_step_4"));
  EXPECT_TRUE(fs::exists(dir / "epoch_0_step_6"));
  EXPECT_TRUE(fs::exists(dir / "epoch_0_step_8"));
  EXPECT_TRUE(fs::exists(dir / ".tmp_epoch_0_step_10"));  // not a complete checkpoint: not ours to delete
  EXPECT_TRUE(prune_checkpoints(dir.string(), 0).empty());
  fs::remove_all(dir);
}

TEST(RecipeSchema, DocsTableIsGenerated) {
  const fs::path doc = fs::path(AM_SOURCE_DIR) / "docs" / "recipes.md";
  std::ifstream in(doc);
  ASSERT_TRUE(in) << doc;
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  const std::string begin = "<!-- keys:begin -->\n", end = "<!-- keys:end -->";
  const size_t b = text.find(begin), e = text.find(end);
  ASSERT_TRUE(b != std::string::npos && e != std::string::npos && e > b);
  const std::string want = config::key_table_markdown();
  const std::string have = text.substr(b + begin.size(), e - b - begin.size());
  if (have != want && std::getenv("AM_UPDATE_DOCS")) {
    text = text.substr(0, b + begin.size()) + want + text.substr(e);
    std::ofstream(doc) << text;
    return;
  }
  EXPECT_EQ(have, want) << "docs/recipes.md is out of date: run AM_UPDATE_DOCS=1 am_tests --gtest_filter='RecipeSchema.*'";
}
