// MoE beyond the HF goldens (test_hf_golden.cpp runs those): checkpoints round-trip bit for bit in the
// layout they came in (hub per-expert, transformers 5 fused, mixtral's block_sparse_moe names, bf16),
// loading never holds a second copy of the experts, both layouts give the same model, and the training
// extras (aux loss with recompute, utilisation metrics, fake balanced gate) behave.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/allocator.h"
#include "core/error.h"
#include "data/dataset.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "models/hf_weights.h"
#include "config/recipe.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace am;

namespace {

fs::path golden(const std::string& c) { return fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden" / c; }

fs::path fresh_dir(const std::string& name) {
  fs::path d = fs::path(AM_BINARY_DIR) / "test_out" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::unique_ptr<CausalLM> load(const fs::path& dir) {
  auto m = build_model(io::load_model_config((dir / "config.json").string()));
  load_hf_weights(*m, dir.string());
  return m;
}

// Same names, shapes, dtypes and bytes.
void expect_identical_files(const fs::path& a, const fs::path& b) {
  auto sa = io::SafeTensors::open(a.string()), sb = io::SafeTensors::open(b.string());
  ASSERT_EQ(sa.names(), sb.names()) << a << " vs " << b;
  for (auto& n : sa.names()) {
    Tensor x = sa.get(n), y = sb.get(n);
    ASSERT_EQ(x.shape(), y.shape()) << n;
    ASSERT_EQ(x.dtype(), y.dtype()) << n;
    EXPECT_EQ(std::memcmp(x.raw(), y.raw(), x.nbytes()), 0) << "bytes differ: " << n;
  }
}

Batch one_batch(int64_t vocab) {
  std::vector<Sample> s(2);
  for (int i = 0; i < 9; ++i) s[0].input_ids.push_back(1 + (i * 7) % static_cast<int>(vocab - 1));
  for (int i = 0; i < 5; ++i) s[1].input_ids.push_back(1 + (i * 13) % static_cast<int>(vocab - 1));
  for (auto& x : s) x.labels = x.input_ids;
  return collate({&s[0], &s[1]});
}

TEST(MoeCheckpoint, PerExpertLayoutRoundTripsBitForBit) {
  for (const char* c : {"qwen3_moe", "mixtral", "qwen2_moe", "olmoe"}) {
    auto m = load(golden(c) / "model");
    const fs::path out = fresh_dir(std::string("moe_rt_") + c);
    save_hf_model(*m, out.string(), "");
    expect_identical_files(golden(c) / "model", out);
  }
}

TEST(MoeCheckpoint, FusedLayoutLoadsToTheSameModelAndRoundTrips) {
  for (const char* c : {"qwen3_moe", "mixtral"}) {
    auto a = load(golden(c) / "model");
    auto b = load(golden(c) / "model_alt");  // transformers 5 fused names (mixtral: mlp.* instead of block_sparse_moe)
    for (auto& p : a->params().all()) {
      const Param& q = b->params().get(p.name);
      EXPECT_EQ(std::memcmp(p.value.raw(), q.value.raw(), p.value.nbytes()), 0) << c << " " << p.name;
    }
    Batch batch = one_batch(a->config().vocab_size);
    Tensor la = a->forward_logits(batch), lb = b->forward_logits(batch);
    EXPECT_EQ(std::memcmp(la.raw(), lb.raw(), la.nbytes()), 0) << c;
    const fs::path out = fresh_dir(std::string("moe_rt_fused_") + c);
    save_hf_model(*b, out.string(), "");
    expect_identical_files(golden(c) / "model_alt", out);
  }
}

TEST(MoeCheckpoint, Bf16RoundTripsBitForBit) {
  auto m = load(golden("qwen3_moe") / "model");
  for (auto& p : m->params().all()) p.source_dtype = DType::BF16;
  const fs::path a = fresh_dir("moe_bf16_a"), b = fresh_dir("moe_bf16_b");
  save_hf_model(*m, a.string(), "");
  auto m2 = load(a);
  for (auto& p : m2->params().all()) EXPECT_EQ(p.source_dtype, DType::BF16) << p.name;
  save_hf_model(*m2, b.string(), "");
  expect_identical_files(a, b);
}

TEST(MoeCheckpoint, LoadingCopiesExpertsOnceWithoutASecondBuffer) {
  // Parameters are allocated when the model is built; loading must not allocate a second full-size copy
  // of any fused expert tensor (slices are copied straight from the mmapped file).
  auto cfg = io::load_model_config((golden("qwen3_moe") / "model" / "config.json").string());
  auto m = build_model(cfg);
  Allocator& a = cpu_allocator();
  a.reset_peak();
  const size_t before = a.current_bytes();
  load_hf_weights(*m, (golden("qwen3_moe") / "model").string());
  const size_t layer_experts = static_cast<size_t>(m->params().get("model.layers.0.mlp.experts.gate_up_proj").value.nbytes());
  EXPECT_LT(a.peak_bytes() - before, layer_experts) << "loading allocated " << a.peak_bytes() - before << " bytes";
}

TEST(MoeCheckpoint, MissingExpertNamesTheTensor) {
  const fs::path dir = fresh_dir("moe_missing");
  auto m = load(golden("mixtral") / "model");
  save_hf_model(*m, dir.string(), "");
  // Rewrite the file without one expert tensor.
  auto st = io::SafeTensors::open(dir.string());
  std::vector<std::pair<std::string, Tensor>> keep;
  for (auto& n : st.names())
    if (n != "model.layers.1.block_sparse_moe.experts.2.w3.weight") keep.emplace_back(n, st.get(n).clone());
  fs::remove(dir / "model.safetensors");
  io::save_safetensors_dir(dir.string(), keep, {});
  auto m2 = build_model(io::load_model_config((dir / "config.json").string()));
  try {
    load_hf_weights(*m2, dir.string());
    FAIL() << "expected a FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.block_sparse_moe.experts.2.w3.weight"), std::string::npos) << e.what();
  }
}

TEST(MoeTraining, RecomputeGivesTheSameNumbersWithAuxLoss) {
  const fs::path dir = golden("qwen3_moe_aux");
  std::vector<StepStats> a, b;
  a = Trainer(Recipe::load((dir / "recipe.yaml").string(), {"checkpoint.enabled=false"}), {.quiet = true}).train();
  b = Trainer(Recipe::load((dir / "recipe.yaml").string(),
                           {"checkpoint.enabled=false", "distributed.activation_checkpointing=true"}),
              {.quiet = true})
          .train();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].loss, b[i].loss) << "step " << i + 1;
    EXPECT_EQ(a[i].grad_norm, b[i].grad_norm) << "step " << i + 1;
    EXPECT_EQ(a[i].extra.dump(), b[i].extra.dump()) << "step " << i + 1;
  }
}

TEST(MoeTraining, UtilisationMetricsGoToTrainingJsonl) {
  const fs::path dir = golden("qwen3_moe_aux"), out = fresh_dir("moe_metrics");
  Trainer(Recipe::load((dir / "recipe.yaml").string(), {"checkpoint.checkpoint_dir=" + out.string()}), {.quiet = true})
      .train();
  std::ifstream f(out / "training.jsonl");
  std::ifstream ef(dir / "expected.json");
  json exp = json::parse(ef)["steps"];
  std::string line;
  size_t n = 0;
  while (std::getline(f, line)) {
    json j = json::parse(line);
    ASSERT_TRUE(j.contains("moe_expert_cv") && j.contains("moe_dead_expert_frac") && j.contains("router_aux_loss")) << line;
    EXPECT_GE(j["moe_expert_cv"].get<double>(), 0.0);
    EXPECT_GE(j["moe_dead_expert_frac"].get<double>(), 0.0);
    EXPECT_LE(j["moe_dead_expert_frac"].get<double>(), 1.0);
    // The aux loss HF computed for each micro-batch, averaged (the engine's metric is the same mean).
    double want = 0;
    for (auto& v : exp[n]["micro_batch_aux_losses"]) want += v.get<double>();
    want /= static_cast<double>(exp[n]["micro_batch_aux_losses"].size());
    EXPECT_NEAR(j["router_aux_loss"].get<double>(), want, 1e-5 * want) << "step " << n + 1;
    ++n;
  }
  EXPECT_EQ(n, 4u);
}

// SPEC §4 for MoE: 2 steps + resume + 2 steps = 4 steps straight (aux loss on, shuffled data), and the resumed
// run's export is still in the source's per-expert layout.
TEST(MoeTraining, ResumeContinuesExactly) {
  const fs::path dir = golden("qwen3_moe_aux"), a = fresh_dir("moe_resume_a"), b = fresh_dir("moe_resume_b");
  const std::string recipe = (dir / "recipe.yaml").string();
  auto straight = Trainer(Recipe::load(recipe, {"checkpoint.checkpoint_dir=" + a.string(), "dataloader.shuffle=true"}),
                          {.quiet = true})
                      .train();
  Trainer(Recipe::load(recipe, {"checkpoint.checkpoint_dir=" + b.string(), "dataloader.shuffle=true",
                                "step_scheduler.ckpt_every_steps=2"}),
          {.quiet = true})
      .train();
  fs::remove(b / "LATEST");  // a symbolic link (SPEC §4); the plain-file form is still read
  std::ofstream(b / "LATEST") << "epoch_0_step_2\n";
  auto second = Trainer(Recipe::load(recipe, {"checkpoint.checkpoint_dir=" + b.string(), "dataloader.shuffle=true",
                                              "checkpoint.restore_from=LATEST"}),
                        {.quiet = true})
                    .train();
  ASSERT_EQ(straight.size(), 4u);
  ASSERT_EQ(second.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(second[i].loss, straight[2 + i].loss) << "step " << 3 + i;
    EXPECT_EQ(second[i].grad_norm, straight[2 + i].grad_norm) << "step " << 3 + i;
  }
  expect_identical_files(a / "epoch_0_step_4/model/consolidated", b / "epoch_0_step_4/model/consolidated");
  auto st = io::SafeTensors::open((b / "epoch_0_step_4/model/consolidated").string());
  EXPECT_TRUE(st.has("model.layers.0.mlp.experts.5.down_proj.weight"));
}

TEST(MoeTraining, FakeBalancedGateSpreadsTokensEvenlyAndFreezesTheRouter) {
  const fs::path dir = golden("qwen3_moe");
  Trainer t(Recipe::load((dir / "recipe.yaml").string(),
                         {"checkpoint.enabled=false", "model.backend.fake_balanced_gate=true", "clip_grad_norm.max_norm=null"}),
            {.quiet = true});
  auto steps = t.run_steps(1);
  ASSERT_EQ(steps.size(), 1u);
  EXPECT_TRUE(std::isfinite(steps[0].loss));
  EXPECT_EQ(steps[0].extra["moe_dead_expert_frac"].get<double>(), 0.0);
  EXPECT_LT(steps[0].extra["moe_expert_cv"].get<double>(), 0.05);  // round-robin: counts differ by at most 1
  const Param& router = t.model().params().get("model.layers.0.mlp.gate.weight");
  for (int64_t i = 0; i < router.grad.numel(); ++i) ASSERT_EQ(router.grad.f32()[i], 0.f);
}

}  // namespace
