// optimizer_in_bwd on CUDA (train/optimizer_in_bwd.h), which is on by default where it changes no update (one GPU,
// one micro-batch per step, no clipping: train/trainer.h optimizer_in_bwd_is_exact). Its CUDA update is one fused
// pass per unit (the sum of squares and, pure bf16, the rounding to bf16 inside AdamW: core/adamw_params.h
// AdamWFused). A golden fixture trained with the default and with `optimizer_in_bwd: false` must give the same loss
// at every step (the updates are the same numbers) and the same grad norm up to the order of its double sum, with
// fp32 masters and in pure bf16, dense and MoE.
// Runs only where a CUDA device is visible (GTEST_SKIP otherwise).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "gpu_test_util.h"

namespace fs = std::filesystem;
using namespace am;

namespace {

fs::path golden(const std::string& name) {
  for (fs::path p : {fs::path("tests/fixtures/golden"), fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden"})
    if (fs::exists(p / name / "recipe.yaml")) return p / name;
  return {};
}

TEST(CudaOptimizerInBwd, DefaultTrainsAsTheOrdinaryStep) {
  AM_REQUIRE_DEVICE();
  for (const std::string c : {"llama", "qwen3_moe"})
    for (const std::string dtype : {"float32", "bfloat16"}) {
      const fs::path dir = golden(c);
      if (dir.empty()) GTEST_SKIP() << "no tests/fixtures/golden/" << c;
      SCOPED_TRACE(c + " model.dtype " + dtype);
      // The fixtures accumulate two micro-batches and clip: one micro-batch of 4 and no clipping make the default
      // optimizer_in_bwd (the recipe does not set it).
      const std::vector<std::string> base = {"step_scheduler.local_batch_size=4", "clip_grad_norm.max_norm=null",
                                             "model.dtype=" + dtype};
      std::vector<std::string> off = base;
      off.push_back("optimizer_in_bwd=false");
      const auto on = gpu_test::train_fixture(dir, "cuda", base), ref = gpu_test::train_fixture(dir, "cuda", off);
      ASSERT_EQ(on.size(), ref.size());
      ASSERT_GE(on.size(), 2u);
      for (size_t i = 0; i < on.size(); ++i) {
        std::printf("[in_bwd %s %s] step %zu loss %.9g vs %.9g (%s) grad_norm %.9g vs %.9g\n", c.c_str(), dtype.c_str(),
                    i + 1, on[i].loss, ref[i].loss, on[i].loss == ref[i].loss ? "equal" : "DIFFERENT", on[i].grad_norm,
                    ref[i].grad_norm);
        // Step 1's loss precedes any update; later steps see the updated weights: equal losses mean equal updates
        // (the forward is deterministic). A tiny tolerance only, for a backward with atomics.
        EXPECT_NEAR(on[i].loss, ref[i].loss, 1e-6 * std::abs(ref[i].loss)) << "step " << i + 1;
        EXPECT_NEAR(on[i].grad_norm, ref[i].grad_norm, 1e-5 * ref[i].grad_norm) << "step " << i + 1;
      }
      std::fflush(stdout);
    }
}

}  // namespace
