// One rank is the oracle for N ranks: every HF golden family fine-tuned at world 2 (mpirun -np 2 in CI)
// must give the golden's per-step loss, grad norm and final weights to the single-rank tolerances (loss
// 1e-4 relative, grad norm 1e-3, weights 1e-4):
//   dp=2 with fsdp2 and with ddp for every family, ep=2 (fsdp2 for the dense part) for the MoE families.
// And checkpoints reshard: a checkpoint written at world 2 resumes at world 1 and the reverse, giving the
// golden's numbers for the remaining steps.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/allocator.h"
#include "core/error.h"
#include "dist/launch.h"
#include "dist_test_env.h"
#include "io/safetensors.h"
#include "train/checkpoint.h"
#include "config/recipe.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace am;

namespace {

fs::path golden_dir() { return fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden"; }

std::vector<std::string> cases(bool moe_only) {
  std::ifstream f(golden_dir() / "index.json");
  const json index = json::parse(f);  // kept: a range-for over json::parse(f)["cases"] would dangle
  std::vector<std::string> out;
  for (auto& c : index["cases"]) {
    std::ifstream cf(golden_dir() / c.get<std::string>() / "model" / "config.json");
    const bool moe = json::parse(cf).dump().find("experts") != std::string::npos;
    if (!moe_only || moe) out.push_back(c.get<std::string>());
  }
  return out;
}

dist::Communicator& world() { return dist::test::world(); }

// A fresh folder shared by every rank (rank 0 clears it).
fs::path shared_dir(const std::string& name) {
  fs::path d = fs::path(AM_BINARY_DIR) / "test_out" / "dist" / name;
  if (world().rank() == 0) {
    fs::remove_all(d);
    fs::create_directories(d);
  }
  world().barrier();
  return d;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  Tensor x = a.to(DType::F32), y = b.to(DType::F32);
  double m = 0;
  for (int64_t i = 0; i < x.numel(); ++i) m = std::max(m, std::abs(double(x.f32()[i]) - double(y.f32()[i])));
  return m;
}

json expected_steps(const std::string& c) {
  std::ifstream ef(golden_dir() / c / "expected.json");
  return json::parse(ef)["steps"];
}

// Per-step numbers against the golden, steps [first, first + got.size()).
void expect_steps(const std::string& what, const std::vector<StepStats>& got, size_t first) {
  const json exp = expected_steps(what.substr(0, what.find(' ')));
  ASSERT_LE(first + got.size(), exp.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    const json& e = exp[first + i];
    const double el = e["loss"], eg = e["grad_norm"];
    EXPECT_EQ(got[i].num_label_tokens, e["num_label_tokens"].get<int64_t>()) << what << " step " << first + i + 1;
    EXPECT_LT(std::abs(got[i].loss - el) / el, 1e-4) << what << " step " << first + i + 1 << " loss " << got[i].loss << " vs " << el;
    EXPECT_LT(std::abs(got[i].grad_norm - eg) / eg, 1e-3)
        << what << " step " << first + i + 1 << " grad_norm " << got[i].grad_norm << " vs " << eg;
  }
}

// The consolidated export (names, shapes, dtypes of the source; values of HF's final weights).
void expect_final_weights(const std::string& what, const std::string& c, const fs::path& ckpt) {
  const fs::path cons = ckpt / "LATEST" / "model" / "consolidated";
  ASSERT_TRUE(fs::exists(cons / "config.json")) << what;
  auto got = io::SafeTensors::open(cons.string());
  auto src = io::SafeTensors::open((golden_dir() / c / "model").string());
  auto want = io::SafeTensors::open((golden_dir() / c / "expected_final.safetensors").string());
  EXPECT_EQ(got.names(), src.names()) << what;
  for (auto& name : src.names()) {
    ASSERT_TRUE(got.has(name)) << what << " " << name;
    EXPECT_EQ(got.info(name).shape, src.info(name).shape) << what << " " << name;
    EXPECT_EQ(got.info(name).dtype, src.info(name).dtype) << what << " " << name;
    EXPECT_LT(max_abs_diff(got.get(name), want.get(name)), 1e-4) << what << " final weight " << name;
  }
}

TrainerOptions at_world() {
  TrainerOptions o;
  o.quiet = true;
  o.launch = dist::detect_launch();
  return o;
}

std::vector<StepStats> run(const std::string& c, const fs::path& ck, std::vector<std::string> overrides,
                           TrainerOptions opt = at_world()) {
  overrides.push_back("checkpoint.checkpoint_dir=" + ck.string());
  Recipe r = Recipe::load((golden_dir() / c / "recipe.yaml").string(), overrides);
  Trainer t(r, opt);
  return t.train();
}

struct Mode {
  std::string name;
  std::vector<std::string> overrides;
};

class DistGolden : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

const std::vector<Mode>& modes() {
  static const std::vector<Mode> m = {{"fsdp2", {"distributed.strategy=fsdp2"}},
                                      {"ddp", {"distributed.strategy=ddp"}},
                                      {"ep2", {"distributed.strategy=fsdp2", "distributed.ep_size=2"}}};
  return m;
}

TEST_P(DistGolden, World2MatchesTransformers) {
  const auto [c, mi] = GetParam();
  const Mode& m = modes()[static_cast<size_t>(mi)];
  ASSERT_EQ(world().size(), 2) << "run under mpirun -np 2";
  const fs::path ck = shared_dir(c + "_" + m.name);
  // gpt_oss and nemotron_h have no expert parallelism yet: the run must refuse it with a UsageError naming
  // distributed.ep_size (exit 2 from the CLI), on every rank, before training.
  std::ifstream cf(golden_dir() / c / "model" / "config.json");
  const std::string model_type = json::parse(cf).value("model_type", "");
  if (m.name == "ep2" && (model_type == "gpt_oss" || model_type == "nemotron_h")) {
    try {
      run(c, ck, m.overrides);
      ADD_FAILURE() << c << ": expert parallelism was not refused";
    } catch (const UsageError& e) {
      EXPECT_NE(std::string(e.what()).find("ep_size"), std::string::npos) << e.what();
    }
    world().barrier();
    return;
  }
  auto steps = run(c, ck, m.overrides);
  ASSERT_EQ(steps.size(), 4u);
  expect_steps(c + " " + m.name, steps, 0);
  world().barrier();
  expect_final_weights(c + " " + m.name, c, ck);
  world().barrier();
}

std::vector<std::tuple<std::string, int>> golden_params() {
  std::vector<std::tuple<std::string, int>> out;
  for (auto& c : cases(false)) {
    out.emplace_back(c, 0);
    out.emplace_back(c, 1);
  }
  for (auto& c : cases(true)) out.emplace_back(c, 2);
  return out;
}

INSTANTIATE_TEST_SUITE_P(Families, DistGolden, ::testing::ValuesIn(golden_params()), [](const auto& info) {
  return std::get<0>(info.param) + "_" + modes()[static_cast<size_t>(std::get<1>(info.param))].name;
});

// LATEST -> epoch_0_step_2 (as if the run had died after step 2).
void rewind_to_step2(const fs::path& ck) {
  if (world().rank() == 0) {
    fs::remove(ck / "LATEST");
    fs::create_directory_symlink("epoch_0_step_2", ck / "LATEST");
  }
  world().barrier();
}

// A checkpoint written by 2 ranks resumes on 1 (rank 0 alone), and one written by 1 rank resumes on 2,
// with the golden's numbers for steps 3 and 4 and its final weights.
void resume_across(const std::string& c, const std::vector<std::string>& dist_overrides, const std::string& tag) {
  std::vector<std::string> ov = dist_overrides;
  ov.push_back("step_scheduler.ckpt_every_steps=2");
  {  // 2 -> 1
    const fs::path ck = shared_dir(c + "_resume_2to1_" + tag);
    run(c, ck, ov);
    rewind_to_step2(ck);
    if (world().rank() == 0) {
      TrainerOptions one;
      one.quiet = true;
      auto rest = run(c, ck, {"checkpoint.restore_from=LATEST"}, one);
      ASSERT_EQ(rest.size(), 2u);
      EXPECT_EQ(rest[0].step, 3);
      expect_steps(c + " resumed 2->1 " + tag, rest, 2);
      expect_final_weights(c + " resumed 2->1 " + tag, c, ck);
    }
    world().barrier();
  }
  {  // 1 -> 2
    const fs::path ck = shared_dir(c + "_resume_1to2_" + tag);
    if (world().rank() == 0) {
      TrainerOptions one;
      one.quiet = true;
      run(c, ck, {"step_scheduler.ckpt_every_steps=2"}, one);
    }
    world().barrier();
    rewind_to_step2(ck);
    std::vector<std::string> ov2 = dist_overrides;
    ov2.push_back("checkpoint.restore_from=LATEST");
    auto rest = run(c, ck, ov2);
    ASSERT_EQ(rest.size(), 2u);
    expect_steps(c + " resumed 1->2 " + tag, rest, 2);
    world().barrier();
    expect_final_weights(c + " resumed 1->2 " + tag, c, ck);
    world().barrier();
  }
}

TEST(DistResume, DenseFsdp2AcrossWorldSizes) { resume_across("llama_yarn_sched", {"distributed.strategy=fsdp2"}, "fsdp2"); }
TEST(DistResume, DenseDdpAcrossWorldSizes) { resume_across("qwen2", {"distributed.strategy=ddp"}, "ddp"); }
TEST(DistResume, MoeExpertParallelAcrossWorldSizes) {
  resume_across("qwen3_moe_aux", {"distributed.ep_size=2"}, "ep2");
}

// fsdp2 holds 1/2 of the master weights, gradients and optimizer state per rank, ddp all of them. What a
// rank keeps between steps (allocator bytes after training, the trainer alive) must show it; the peaks
// during training (activations included) are printed next to it, with world 1, for docs/distributed.md.
struct Mem {
  double kept = 0, peak = 0;  // MiB
};

Mem training_memory(const std::string& c, const fs::path& ck, const std::vector<std::string>& extra, TrainerOptions opt) {
  std::vector<std::string> ov = extra;
  ov.push_back("checkpoint.checkpoint_dir=" + ck.string());
  ov.push_back("checkpoint.enabled=false");
  Recipe r = Recipe::load((golden_dir() / c / "recipe.yaml").string(), ov);
  const double base = static_cast<double>(cpu_allocator().current_bytes());
  Trainer t(r, opt);
  cpu_allocator().reset_peak();  // after loading: the steady state of training
  t.train();
  return {(static_cast<double>(cpu_allocator().current_bytes()) - base) / 1048576.0,
          (static_cast<double>(cpu_allocator().peak_bytes()) - base) / 1048576.0};
}

TEST(DistMemory, Fsdp2KeepsHalfOfDdp) {
  const std::string c = "qwen3";
  const fs::path ck = shared_dir("mem");
  Mem one;
  if (world().rank() == 0) {
    TrainerOptions o;
    o.quiet = true;
    one = training_memory(c, ck, {}, o);
  }
  world().barrier();
  const Mem fsdp = training_memory(c, ck, {"distributed.strategy=fsdp2"}, at_world());
  const Mem ddp = training_memory(c, ck, {"distributed.strategy=ddp"}, at_world());
  if (world().rank() == 0)
    std::printf("[dist] %s golden (137,152 parameters), CPU allocator per rank, kept between steps / peak in a step: "
                "world 1 %.3f / %.3f MiB; world 2 fsdp2 %.3f / %.3f MiB; world 2 ddp %.3f / %.3f MiB\n",
                c.c_str(), one.kept, one.peak, fsdp.kept, fsdp.peak, ddp.kept, ddp.peak);
  EXPECT_LT(fsdp.kept, 0.6 * ddp.kept);
  EXPECT_LE(fsdp.peak, ddp.peak);
}

// model.dtype bfloat16 under data parallelism (dist/data_parallel.h, pure_bf16): one rank in pure bf16 is the
// oracle. With one micro-batch per step on both sides, each rank's bucket rounds the reduced fp32 gradient to
// bf16 once, as one rank rounds its own once; only the order of the fp32 sums differs (two ranks' partial sums
// plus a reduction vs one backward), which can move a rounding by one bf16 ulp. The state really is bf16 (the
// checkpoint's AdamW state), and the numbers follow one rank's to bf16 precision.
TEST(DistPureBf16, World2FollowsOneRank) {
  const int rank = world().rank();
  for (const std::string c : {"llama", "qwen3_moe"}) {
    const std::vector<std::string> common = {"model.dtype=bfloat16", "step_scheduler.global_batch_size=2",
                                             "checkpoint.save_consolidated=final"};
    // One rank (each MPI rank runs it alone, in its own folder): a micro-batch of 2.
    const fs::path ref_dir = shared_dir("pure_" + c + "_ref") / std::to_string(rank);
    std::vector<std::string> one_ov = common;
    one_ov.push_back("step_scheduler.local_batch_size=2");
    TrainerOptions alone;
    alone.quiet = true;
    const auto ref = run(c, ref_dir, one_ov, alone);
    for (const Mode& m : modes()) {
      if (m.name == "ep2" && c == "llama") continue;
      const std::string what = c + " pure bf16 " + m.name;
      const fs::path ck = shared_dir("pure_" + c + "_" + m.name);
      std::vector<std::string> ov = common;
      ov.push_back("step_scheduler.local_batch_size=1");
      for (auto& o : m.overrides) ov.push_back(o);
      const auto got = run(c, ck, ov);
      ASSERT_EQ(got.size(), ref.size()) << what;
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_LT(std::abs(got[i].loss - ref[i].loss) / ref[i].loss, 2e-3) << what << " step " << i + 1;
        EXPECT_LT(std::abs(got[i].grad_norm - ref[i].grad_norm) / ref[i].grad_norm, 2e-2) << what << " step " << i + 1;
      }
      if (rank == 0) {
        // The AdamW state in the checkpoint is bf16 (fp32-master data parallelism would write fp32).
        auto st = io::SafeTensors::open((ck / "LATEST" / "state" / "rank_00000-of-00002.safetensors").string());
        int64_t states = 0;
        for (auto& name : st.names())
          if (name.rfind("exp_avg", 0) == 0) {
            ++states;
            EXPECT_EQ(st.info(name).dtype, DType::BF16) << what << " " << name;
          }
        EXPECT_GT(states, 0) << what;
        // Final weights: bf16 values on both sides; elements apart by more than 2 bf16 ulps are counted.
        auto a = io::SafeTensors::open((ck / "LATEST" / "model" / "consolidated").string());
        auto b = io::SafeTensors::open((ref_dir / "LATEST" / "model" / "consolidated").string());
        int64_t n = 0, far = 0, differ = 0;
        for (auto& name : b.names()) {
          const Tensor x = a.get(name).to(DType::F32), y = b.get(name).to(DType::F32);
          for (int64_t i = 0; i < y.numel(); ++i) {
            const float u = x.f32()[i], v = y.f32()[i];
            ++n;
            differ += u != v;
            far += std::abs(u - v) > 2 * std::ldexp(1.0f, std::ilogb(std::max(std::abs(v), 1e-30f)) - 7);
          }
        }
        std::printf("[dist] %s: final weights differing from one rank's: %lld of %lld (%lld beyond 2 bf16 ulps)\n",
                    what.c_str(), static_cast<long long>(differ), static_cast<long long>(n), static_cast<long long>(far));
        EXPECT_LT(far, n / 1000 + 1) << what;
      }
      world().barrier();
    }
  }
}

// Pure bf16 under fsdp2 resumes exactly: a checkpoint of step 2 (bf16 values and state, sharded) read back at
// the same world size gives steps 3 and 4 of the straight run bit for bit.
TEST(DistPureBf16, ResumeIsExact) {
  const std::string c = "qwen3";
  const std::vector<std::string> ov = {"model.dtype=bfloat16", "step_scheduler.global_batch_size=2",
                                       "step_scheduler.local_batch_size=1", "distributed.strategy=fsdp2",
                                       "checkpoint.save_consolidated=false", "step_scheduler.ckpt_every_steps=2"};
  const auto straight = run(c, shared_dir("pure_resume_straight"), ov);
  ASSERT_EQ(straight.size(), 4u);
  const fs::path ck = shared_dir("pure_resume_split");
  run(c, ck, ov);
  rewind_to_step2(ck);
  std::vector<std::string> ov2 = ov;
  ov2.push_back("checkpoint.restore_from=LATEST");
  const auto rest = run(c, ck, ov2);
  ASSERT_EQ(rest.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(rest[i].loss, straight[i + 2].loss) << "step " << i + 3;
    EXPECT_EQ(rest[i].grad_norm, straight[i + 2].grad_norm) << "step " << i + 3;
  }
  world().barrier();
}

// fsdp2's unsharded gradient lives only from a unit's backward to its reduce-scatter, in every micro-batch,
// so a step never holds the whole model's unsharded gradient (4 bytes x N), with or without gradient
// accumulation. A model whose parameters dwarf its activations (16 layers of hidden 128, 8 tokens a sample,
// ~4 M parameters) shows it in the allocator's peak over what a rank keeps between steps: the gathered
// root and two layers (current + prefetched) plus about two layers' unsharded gradient, well under 4 N.
TEST(DistMemory, Fsdp2NeverHoldsTheWholeUnshardedGradient) {
  const fs::path d = shared_dir("mem_grad");
  if (world().rank() == 0) {
    std::ofstream(d / "config.json") << R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": 256, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 16,
      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu",
      "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false})";
    std::ofstream(d / "recipe.yaml") << "seed: 7\nmodel:\n  config: config.json\n"
                                        "step_scheduler:\n  global_batch_size: 2\n  local_batch_size: 1\n  max_steps: 2\n"
                                        "dataset:\n  _target_: mock\n  seq_len: 8\n  num_samples: 16\n"
                                        "optimizer:\n  _target_: torch.optim.AdamW\n  lr: 1.0e-4\n"
                                        "checkpoint:\n  enabled: false\n";
  }
  world().barrier();
  for (const char* gbs : {"2", "8"}) {  // one micro-batch per rank and step, then four (accumulation)
    Recipe r = Recipe::load((d / "recipe.yaml").string(),
                            {"distributed.strategy=fsdp2", std::string("step_scheduler.global_batch_size=") + gbs,
                             "checkpoint.checkpoint_dir=" + (d / "ck").string()});
    const double base = static_cast<double>(cpu_allocator().current_bytes());
    Trainer t(r, at_world());
    const double n = static_cast<double>(t.model().params().global_numel());
    t.run_steps(1);  // the first step makes the optimizer state
    const double kept0 = static_cast<double>(cpu_allocator().current_bytes());
    cpu_allocator().reset_peak();
    t.run_steps(1);
    const double in_step = static_cast<double>(cpu_allocator().peak_bytes()) - kept0;
    if (world().rank() == 0)
      std::printf("[dist] fsdp2, gbs %s, %.0f parameters: rank kept %.3f MiB, step peak over kept %.3f MiB "
                  "(the whole unsharded gradient: %.3f MiB)\n",
                  gbs, n, (kept0 - base) / 1048576.0, in_step / 1048576.0, 4 * n / 1048576.0);
    EXPECT_LT(in_step, 0.5 * 4 * n) << "gbs " << gbs;
    world().barrier();
  }
}

// MoE memory at scale: with ep_size 2 a rank registers and reads only its half of every sparse layer's
// experts, so the bytes it allocates while loading the model fall accordingly.
TEST(DistExperts, EachRankLoadsOnlyItsExperts) {
  const std::string c = "qwen3_moe";
  const fs::path ck = shared_dir("ep_load");
  auto load = [&](const std::vector<std::string>& extra, TrainerOptions opt, int64_t* expert_elems) {
    std::vector<std::string> ov = extra;
    ov.push_back("checkpoint.checkpoint_dir=" + ck.string());
    Recipe r = Recipe::load((golden_dir() / c / "recipe.yaml").string(), ov);
    const size_t base = cpu_allocator().current_bytes();
    cpu_allocator().reset_peak();
    Trainer t(r, opt);
    *expert_elems = 0;
    for (auto& p : t.model().params().all())
      if (p.expert) *expert_elems += shape_numel(p.shape);
    return static_cast<double>(cpu_allocator().peak_bytes() - base);
  };
  int64_t e1 = 0, e2 = 0;
  double peak1 = 0;
  if (world().rank() == 0) {
    TrainerOptions o;
    o.quiet = true;
    peak1 = load({}, o, &e1);
  }
  world().barrier();
  const double peak2 = load({"distributed.ep_size=2", "distributed.strategy=ddp"}, at_world(), &e2);
  if (world().rank() == 0) {
    EXPECT_EQ(2 * e2, e1) << "expert elements per rank at ep_size 2 vs 1";
    EXPECT_LT(peak2, peak1) << "allocator peak while loading, ep_size 2 vs 1";
    std::printf("[dist] %s: expert elements per rank %lld (ep 1) / %lld (ep 2); load peak %.3f / %.3f MiB\n", c.c_str(),
                static_cast<long long>(e1), static_cast<long long>(e2), peak1 / 1048576.0, peak2 / 1048576.0);
  }
  world().barrier();
}

}  // namespace
