// optimizer_in_bwd (train/optimizer_in_bwd.h): each parameter unit is updated as soon as its backward is done.
//   - without clipping it is the ordinary step bit for bit (losses and final weights equal, grad norm to the
//     double sum's order), for every HF golden family, with fp32 masters and in pure bf16, and under LoRA;
//   - clipping uses the previous step's norm: a max_norm no step reaches changes nothing, a small one changes
//     steps 2+ and never step 1, and a resumed run continues exactly (the norm travels in train_state.json);
//   - no whole-model gradient is kept: a rank holds 4 bytes per parameter less between steps (fp32 masters);
//   - what it cannot do is refused with the key named: gradient accumulation.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/recipe.h"
#include "core/allocator.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace am;
using json = nlohmann::json;

namespace {

fs::path golden_dir() { return fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden"; }

fs::path fresh_dir(const std::string& name) {
  fs::path d = fs::path(AM_BINARY_DIR) / "test_out" / "in_bwd" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::vector<std::string> cases() {
  std::ifstream f(golden_dir() / "index.json");
  const json index = json::parse(f);
  std::vector<std::string> out;
  for (auto& c : index["cases"]) out.push_back(c.get<std::string>());
  return out;
}

struct TrainRun {
  std::vector<StepStats> steps;
  std::map<std::string, Tensor> weights;  // fp32 host copies of the trainable parameters after training
};

// A golden's recipe with one micro-batch per step (global = local batch) and the overrides given.
TrainRun train_recipe(const fs::path& recipe, const fs::path& out, std::vector<std::string> ov, bool in_bwd) {
  ov.push_back("checkpoint.checkpoint_dir=" + out.string());
  ov.push_back("step_scheduler.global_batch_size=2");
  ov.push_back("step_scheduler.local_batch_size=2");
  ov.push_back(std::string("optimizer_in_bwd=") + (in_bwd ? "true" : "false"));
  Recipe r = Recipe::load(recipe.string(), ov);
  Trainer t(r, {.quiet = true});
  TrainRun run;
  run.steps = t.train();
  for (auto& p : t.model().params().all())
    if (p.trainable) run.weights[p.name] = p.value.to(DType::F32);
  return run;
}

TrainRun train(const std::string& c, const fs::path& out, std::vector<std::string> ov, bool in_bwd) {
  return train_recipe(golden_dir() / c / "recipe.yaml", out, std::move(ov), in_bwd);
}

void expect_same(const TrainRun& a, const TrainRun& b, const std::string& what) {
  ASSERT_EQ(a.steps.size(), b.steps.size()) << what;
  for (size_t i = 0; i < a.steps.size(); ++i) {
    EXPECT_EQ(a.steps[i].loss, b.steps[i].loss) << what << " step " << i + 1;
    EXPECT_NEAR(a.steps[i].grad_norm, b.steps[i].grad_norm, 1e-12 * a.steps[i].grad_norm) << what << " step " << i + 1;
  }
  ASSERT_EQ(a.weights.size(), b.weights.size()) << what;
  for (auto& [name, w] : a.weights) {
    const Tensor& v = b.weights.at(name);
    ASSERT_EQ(w.numel(), v.numel()) << what << " " << name;
    int64_t differ = 0;
    for (int64_t i = 0; i < w.numel(); ++i) differ += w.f32()[i] != v.f32()[i];
    EXPECT_EQ(differ, 0) << what << " " << name << ": elements differing after training";
  }
}

class InBwdGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(InBwdGolden, UnclippedEqualsTheOrdinaryStep) {
  const std::string c = GetParam();
  const fs::path d = fresh_dir(c);
  for (const char* dtype : {"float32", "bfloat16"}) {
    const std::vector<std::string> ov = {"clip_grad_norm.max_norm=null", std::string("model.dtype=") + dtype,
                                         "checkpoint.enabled=false"};
    const TrainRun plain = train(c, d / "plain", ov, false);
    const TrainRun in_bwd = train(c, d / "in_bwd", ov, true);
    expect_same(plain, in_bwd, c + " " + dtype);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, InBwdGolden, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param; });

// LoRA: the trainable units are the adapters (the frozen base has no gradient either way).
TEST(InBwd, LoraUnclippedEqualsTheOrdinaryStep) {
  for (const char* c : {"llama", "qwen3_moe"}) {
    const fs::path recipe = fs::path(AM_SOURCE_DIR) / "tests/fixtures/lora_golden" / c / "recipe.yaml";
    const fs::path d = fresh_dir(std::string("lora_") + c);
    const std::vector<std::string> ov = {"clip_grad_norm.max_norm=null", "checkpoint.enabled=false"};
    expect_same(train_recipe(recipe, d / "plain", ov, false), train_recipe(recipe, d / "in_bwd", ov, true),
                std::string("lora ") + c);
  }
}

TEST(InBwd, ClipsWithThePreviousStepsNorm) {
  const fs::path d = fresh_dir("clip");
  const TrainRun none = train("llama", d / "a", {"clip_grad_norm.max_norm=null", "checkpoint.enabled=false"}, true);
  // A max_norm above every step's norm: nothing is clipped, the numbers are the unclipped ones.
  const TrainRun high = train("llama", d / "b", {"clip_grad_norm.max_norm=1.0e6", "checkpoint.enabled=false"}, true);
  expect_same(none, high, "max_norm 1e6");
  // A max_norm below every step's norm: step 1 is unclipped (no previous norm), step 2's update is scaled by
  // step 1's coefficient, so step 3's loss moves.
  const TrainRun low = train("llama", d / "c", {"clip_grad_norm.max_norm=0.01", "checkpoint.enabled=false"}, true);
  ASSERT_EQ(low.steps.size(), none.steps.size());
  ASSERT_GE(low.steps.size(), 3u);
  EXPECT_GT(none.steps[0].grad_norm, 0.01);
  EXPECT_EQ(low.steps[0].loss, none.steps[0].loss);
  EXPECT_EQ(low.steps[1].loss, none.steps[1].loss) << "step 1's update is not clipped";
  EXPECT_NE(low.steps[2].loss, none.steps[2].loss) << "step 2's update must be clipped by step 1's norm";
}

TEST(InBwd, ResumeContinuesExactlyWithClipping) {
  const fs::path d = fresh_dir("resume");
  const std::vector<std::string> ov = {"clip_grad_norm.max_norm=0.05", "checkpoint.save_consolidated=false"};
  std::vector<std::string> straight_ov = ov;
  const TrainRun straight = train("llama", d / "straight", straight_ov, true);
  ASSERT_EQ(straight.steps.size(), 4u);
  // Stop after step 2 (max_steps), then resume from LATEST for the rest.
  std::vector<std::string> first = ov;
  first.push_back("step_scheduler.max_steps=2");
  first.push_back("step_scheduler.ckpt_every_steps=2");
  train("llama", d / "split", first, true);
  const fs::path state = d / "split" / "epoch_0_step_2" / "train_state.json";
  ASSERT_TRUE(fs::exists(state));
  EXPECT_TRUE(json::parse(std::ifstream(state)).contains("grad_norm"));
  std::vector<std::string> second = ov;
  second.push_back("checkpoint.restore_from=LATEST");
  const TrainRun rest = train("llama", d / "split", second, true);
  ASSERT_EQ(rest.steps.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(rest.steps[i].loss, straight.steps[i + 2].loss) << "step " << i + 3;
    EXPECT_EQ(rest.steps[i].grad_norm, straight.steps[i + 2].grad_norm) << "step " << i + 3;
  }
  for (auto& [name, w] : straight.weights) {
    const Tensor& v = rest.weights.at(name);
    for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(w.f32()[i], v.f32()[i]) << name << " element " << i;
  }
}

TEST(InBwd, KeepsNoWholeModelGradient) {
  // A model whose parameters dwarf its activations (16 layers of hidden 128, 8 tokens a sample).
  const fs::path d = fresh_dir("mem");
  std::ofstream(d / "config.json") << R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 256, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 16,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu",
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false})";
  std::ofstream(d / "recipe.yaml") << "seed: 7\nmodel:\n  config: config.json\n"
                                      "step_scheduler:\n  global_batch_size: 1\n  local_batch_size: 1\n  max_steps: 2\n"
                                      "dataset:\n  _target_: mock\n  seq_len: 8\n  num_samples: 16\n"
                                      "optimizer:\n  _target_: torch.optim.AdamW\n  lr: 1.0e-4\n"
                                      "checkpoint:\n  enabled: false\n";
  auto kept = [&](bool in_bwd, double* n) {
    Recipe r = Recipe::load((d / "recipe.yaml").string(), {std::string("optimizer_in_bwd=") + (in_bwd ? "true" : "false")});
    const double base = static_cast<double>(cpu_allocator().current_bytes());
    Trainer t(r, {.quiet = true});
    *n = static_cast<double>(t.model().params().numel());
    t.run_steps(2);
    return static_cast<double>(cpu_allocator().current_bytes()) - base;
  };
  double n = 0;
  const double plain = kept(false, &n), in_bwd = kept(true, &n);
  std::printf("[in_bwd] %.0f parameters: kept between steps %.3f MiB (ordinary step) vs %.3f MiB (optimizer_in_bwd); "
              "the fp32 gradient is %.3f MiB\n", n, plain / 1048576.0, in_bwd / 1048576.0, 4 * n / 1048576.0);
  EXPECT_LT(in_bwd, plain - 0.8 * 4 * n);
}

TEST(InBwd, RefusesGradientAccumulation) {
  const fs::path d = fresh_dir("refuse");
  Recipe r = Recipe::load((golden_dir() / "llama" / "recipe.yaml").string(),
                          {"checkpoint.checkpoint_dir=" + d.string(), "optimizer_in_bwd=true"});  // gbs 4, lbs 2
  try {
    Trainer t(r, {.quiet = true});
    FAIL() << "gradient accumulation with optimizer_in_bwd must be refused";
  } catch (const RecipeError& e) {
    EXPECT_NE(std::string(e.what()).find("optimizer_in_bwd"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("global_batch_size"), std::string::npos) << e.what();
    EXPECT_EQ(e.exit_code(), 2);
  }
}

// Left unset, optimizer_in_bwd is on exactly where it changes no update: CUDA, one rank, one micro-batch per step,
// no clipping (a null max_norm is none), full fine-tuning. (The CUDA runs themselves: tests/gpu
// test_cuda_optimizer_in_bwd.cpp.)
TEST(InBwd, OnByDefaultOnlyWhereItChangesNoUpdate) {
  const std::string recipe = (golden_dir() / "llama" / "recipe.yaml").string();  // gbs 4, lbs 2, max_norm 1.0
  auto exact = [&](std::vector<std::string> ov, const std::string& device = "cuda", int world = 1) {
    return optimizer_in_bwd_is_exact(Recipe::load(recipe, ov), device, world);
  };
  const std::vector<std::string> one = {"step_scheduler.local_batch_size=4", "clip_grad_norm.max_norm=null"};
  EXPECT_TRUE(exact(one));
  EXPECT_FALSE(exact(one, "cpu"));
  EXPECT_FALSE(exact(one, "cuda", 2));
  EXPECT_FALSE(exact({"step_scheduler.local_batch_size=4"}));  // clips
  EXPECT_FALSE(exact({"clip_grad_norm.max_norm=null"}));       // two micro-batches
  EXPECT_TRUE(exact({"step_scheduler.local_batch_size=4", "clip_grad_norm=null"}));
  auto lora = one;
  lora.push_back("peft.dim=4");
  EXPECT_FALSE(exact(lora));
}

}  // namespace
