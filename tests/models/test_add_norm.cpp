// AM_FUSED_ADD_NORM (models/blocks/norm.h): the decoder's residual adds formed in the pass of the RMSNorm that reads
// their result (ops::add_rmsnorm_fwd; the MLP output's add deferred into the next layer's input norm or the final
// norm) and the residual-gradient adds in the norms' backward passes (ops::add_rmsnorm_bwd). The fused ops are
// bit-identical to the separate ones, so CPU training with the switch on must give the SAME BITS as with it off:
// every step's loss and grad norm (exact ==) and every final weight (memcmp), after 4 AdamW steps of each golden
// fixture's recipe. Covered: dense families (biases, q/k norms, Gemma's sandwich norms and (1 + w) weights), MoE
// (with the aux loss), MLA, gpt_oss, LoRA, and activation checkpointing (the recomputed layer reads the input the
// fused pass formed). The switch is not vacuous: the fused run counts fused passes, the plain run none.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "config/recipe.h"
#include "models/blocks/norm.h"
#include "models/exec.h"
#include "models/model.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace am;

namespace {

fs::path fixtures() { return fs::path(AM_SOURCE_DIR) / "tests/fixtures"; }

// Restores the process-wide switch at the end of a run.
struct SwitchGuard {
  bool saved = fused_add_norm_enabled();
  explicit SwitchGuard(bool on) { set_fused_add_norm(on); }
  ~SwitchGuard() { set_fused_add_norm(saved); }
};

struct Run {
  std::vector<StepStats> steps;
  std::map<std::string, Tensor> weights;  // host fp32 copies after training
  int64_t fused_passes = 0;
};

Run train(const fs::path& recipe, bool fused, std::vector<std::string> extra = {}) {
  SwitchGuard g(fused);
  extra.push_back("device=cpu");
  extra.push_back("checkpoint.enabled=false");
  Recipe r = Recipe::load(recipe.string(), extra);
  const int64_t before = fused_add_norm_count();
  Trainer t(r, TrainerOptions{.quiet = true});
  Run out;
  out.steps = t.train();
  out.fused_passes = fused_add_norm_count() - before;
  for (Param& p : t.model().params().all()) out.weights[p.name] = ExecContext::download(p.value).clone();
  return out;
}

void expect_same_training(const Run& fused, const Run& plain, const std::string& what) {
  EXPECT_GT(fused.fused_passes, 0) << what << ": the fused path did not run";
  EXPECT_EQ(plain.fused_passes, 0) << what;
  ASSERT_EQ(fused.steps.size(), plain.steps.size()) << what;
  EXPECT_EQ(plain.steps.size(), 4u) << what;
  for (size_t i = 0; i < plain.steps.size(); ++i) {
    EXPECT_EQ(fused.steps[i].loss, plain.steps[i].loss) << what << " step " << i + 1;
    EXPECT_EQ(fused.steps[i].grad_norm, plain.steps[i].grad_norm) << what << " step " << i + 1;
  }
  ASSERT_EQ(fused.weights.size(), plain.weights.size()) << what;
  for (const auto& [name, want] : plain.weights) {
    const Tensor& got = fused.weights.at(name);
    ASSERT_EQ(got.nbytes(), want.nbytes()) << what << ": " << name;
    EXPECT_EQ(std::memcmp(got.raw(), want.raw(), want.nbytes()), 0) << what << ": " << name << " differs";
  }
}

class FusedAddNormFamilies : public ::testing::TestWithParam<std::string> {};

TEST_P(FusedAddNormFamilies, CpuTrainingBitIdenticalOnAndOff) {
  const fs::path recipe = fixtures() / "golden" / GetParam() / "recipe.yaml";
  expect_same_training(train(recipe, true), train(recipe, false), GetParam());
}

INSTANTIATE_TEST_SUITE_P(Families, FusedAddNormFamilies,
                         ::testing::Values("llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral",
                                           "qwen3_moe_aux", "olmoe", "deepseek_v3", "gpt_oss"));

// Activation checkpointing: the forward keeps each layer's input as the fused pass formed it, and backward
// recomputes the layer from it (with norm1 unfused): the same bits as the stored-activation run without the switch.
TEST(FusedAddNorm, ActivationCheckpointingBitIdentical) {
  const fs::path recipe = fixtures() / "golden/qwen3/recipe.yaml";
  expect_same_training(train(recipe, true, {"distributed.activation_checkpointing=true"}), train(recipe, false),
                       "qwen3 recompute (fused) vs stored (plain)");
}

// LoRA on every projection (o_proj / down_proj outputs feed the residual adds; the frozen norms' weights still take
// the norm-weight path, their gradients undefined).
TEST(FusedAddNorm, LoraBitIdentical) {
  const fs::path recipe = fixtures() / "lora_golden/llama/recipe.yaml";
  expect_same_training(train(recipe, true), train(recipe, false), "llama + LoRA");
}

}  // namespace
