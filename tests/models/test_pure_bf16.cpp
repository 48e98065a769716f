// model.dtype: bfloat16 (train/pure_bf16.h, ops::adamw_bf16_step): bf16 parameters, gradients and AdamW state.
//   - the optimizer's element math against torch's single-tensor AdamW on bf16 tensors, written out again here
//     op by op with core/dtype.h's rounding (bit for bit), for AdamW and Adam with weight decay;
//   - stochastic rounding: keeps updates far below a bf16 ulp (in expectation) where round-to-nearest loses
//     them all, and is a pure function of (seed, tensor, step, element);
//   - gradient accumulation: after two micro-batches each bf16 gradient is round(round(g1) + g2) of the fp32
//     gradients a plain model computes from the same bf16 weights (bit for bit);
//   - the trainer: every step's loss within 0.5% of HF's bf16 run (tests/fixtures/golden_bf16), parameters
//     bf16 values, state saved as bf16, and resume equal to the straight run.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/recipe.h"
#include "core/dtype.h"
#include "core/error.h"
#include "data/dataset.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "models/hf_weights.h"
#include "models/model.h"
#include "ops/device.h"
#include "ops/ops.h"
#include "train/pure_bf16.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace am;
using json = nlohmann::json;

namespace {

fs::path fixtures() { return fs::path(AM_SOURCE_DIR) / "tests/fixtures"; }

fs::path fresh_dir(const std::string& name) {
  fs::path d = fs::path(AM_BINARY_DIR) / "test_out" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

float r16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

Tensor bf16_tensor(const std::vector<float>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::BF16);
  for (size_t i = 0; i < v.size(); ++i) t.data<uint16_t>()[i] = f32_to_bf16(v[i]);
  return t;
}
float at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::BF16 ? bf16_to_f32(t.data<uint16_t>()[i]) : t.f32()[i];
}

// torch.optim.AdamW(foreach=False) on bf16 tensors, one op at a time: each op computes in fp32 and rounds.
void torch_bf16_adam(float& w, float g, float& m, float& v, double lr, double b1, double b2, double eps, double wd,
                     int step, bool adamw) {
  const float decay = static_cast<float>(1.0 - lr * wd);
  if (wd != 0) {
    if (adamw) w = r16(w * decay);
    else g = r16(g + static_cast<float>(wd) * w);
  }
  m = r16(m + static_cast<float>(1.0 - b1) * (g - m));
  v = r16(v * static_cast<float>(b2));
  const float gg = g * g;
  v = r16(v + static_cast<float>(1.0 - b2) * gg);
  const double bc1 = 1.0 - std::pow(b1, step), bc2 = 1.0 - std::pow(b2, step);
  float d = r16(std::sqrt(v));
  d = r16(d / static_cast<float>(std::sqrt(bc2)));
  d = r16(d + static_cast<float>(eps));
  const float q = m / d;
  w = r16(w + -static_cast<float>(lr / bc1) * q);
}

TEST(PureBf16Adam, MatchesTorchSingleTensorOpByOp) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t n = 3001;
  for (bool adamw : {true, false}) {
    std::vector<float> w(n), g(n), m(n), v(n);
    for (int64_t i = 0; i < n; ++i) {
      w[i] = r16(nd(rng) * 0.05f);
      g[i] = r16(nd(rng) * 1e-2f);
      m[i] = r16(nd(rng) * 1e-3f);
      v[i] = r16(std::abs(nd(rng)) * 1e-5f);
    }
    Tensor tw = bf16_tensor(w), tg = bf16_tensor(g), tm = bf16_tensor(m), tv = bf16_tensor(v);
    Tensor fw = Tensor::empty({n}, DType::F32);  // the host form of a parameter: fp32 holding bf16 values
    for (int64_t i = 0; i < n; ++i) fw.f32()[i] = w[i];
    Tensor fm = tm.clone(), fv = tv.clone();
    AdamWBf16Hyper h;
    h.lr = 3e-3;
    h.beta1 = 0.9;
    h.beta2 = 0.95;
    h.eps = 1e-8;
    h.weight_decay = 0.1;
    h.step = 3;
    h.decoupled = adamw;
    ops::adamw_bf16_step({{&tw, &tg, &tm, &tv, 1}}, h);
    ops::adamw_bf16_step({{&fw, &tg, &fm, &fv, 1}}, h);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      float ew = w[i], em = m[i], ev = v[i];
      torch_bf16_adam(ew, g[i], em, ev, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, 3, adamw);
      bad += at(tw, i) != ew || at(tm, i) != em || at(tv, i) != ev || fw.f32()[i] != ew || at(fm, i) != em;
    }
    EXPECT_EQ(bad, 0) << (adamw ? "AdamW" : "Adam") << ": elements differing from torch's op-by-op bf16 update";
  }
}

TEST(PureBf16Adam, StochasticRoundingKeepsUpdatesBelowAnUlp) {
  // w = 1 (bf16 spacing below 1 is 2^-8), gradient 1: every AdamW step moves w by ~lr = 1e-4, a twentieth of
  // half a spacing. Round to nearest never moves; stochastic rounding moves by lr per step on average.
  const int64_t n = 8192;
  const int steps = 40;
  auto run = [&](bool sr, uint64_t seed) {
    Tensor w = bf16_tensor(std::vector<float>(n, 1.f)), g = bf16_tensor(std::vector<float>(n, 1.f));
    Tensor m = bf16_tensor(std::vector<float>(n, 0.f)), v = bf16_tensor(std::vector<float>(n, 0.f));
    for (int s = 1; s <= steps; ++s) {
      AdamWBf16Hyper h;
      h.lr = 1e-4;
      h.step = s;
      h.stochastic = sr;
      h.seed = seed;
      ops::adamw_bf16_step({{&w, &g, &m, &v, 42}}, h);
    }
    return w;
  };
  Tensor nearest = run(false, 1), a = run(true, 1), b = run(true, 1), c = run(true, 2);
  double mean = 0;
  int64_t moved = 0, same_ab = 0, same_ac = 0;
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(at(nearest, i), 1.f) << i;
    mean += at(a, i);
    moved += at(a, i) != 1.f;
    same_ab += a.data<uint16_t>()[i] == b.data<uint16_t>()[i];
    same_ac += a.data<uint16_t>()[i] == c.data<uint16_t>()[i];
  }
  mean /= n;
  const double want = 1.0 - steps * 1e-4;  // 0.996
  EXPECT_NEAR(mean, want, 4e-4) << "stochastic rounding should follow the fp32 trajectory on average";
  EXPECT_GT(moved, n / 2);
  EXPECT_EQ(same_ab, n) << "same seed, same draws";
  EXPECT_LT(same_ac, n) << "another seed, other draws";
}

TEST(PureBf16Adam, RefusesWrongDtypes) {
  Tensor w = Tensor::zeros({4}, DType::F32), g = Tensor::zeros({4}, DType::F32), m = bf16_tensor({0, 0, 0, 0}),
         v = bf16_tensor({0, 0, 0, 0});
  AdamWBf16Hyper h;
  EXPECT_THROW(ops::adamw_bf16_step({{&w, &g, &m, &v, 0}}, h), ShapeError);  // fp32 gradient
  Tensor g16 = bf16_tensor({0, 0, 0});
  EXPECT_THROW(ops::adamw_bf16_step({{&w, &g16, &m, &v, 0}}, h), ShapeError);  // sizes differ
}

std::vector<Sample> rows(const fs::path& data, size_t first, size_t n) {
  std::vector<Sample> out;
  std::ifstream in(data);
  std::string line;
  size_t k = 0;
  while (out.size() < n && std::getline(in, line)) {
    if (line.empty() || k++ < first) continue;
    const json j = json::parse(line);
    Sample s;
    s.input_ids = j.at("input_ids").get<std::vector<int32_t>>();
    s.labels = j.contains("labels") ? j["labels"].get<std::vector<int32_t>>() : s.input_ids;
    out.push_back(std::move(s));
  }
  return out;
}

TEST(PureBf16Training, TwoMicroBatchesAccumulateWithOneRoundingEach) {
  const fs::path dir = fixtures() / "golden/qwen3";
  const io::ModelConfig cfg = io::load_model_config((dir / "model/config.json").string());
  auto a = rows(dir / "data.jsonl", 0, 2), b = rows(dir / "data.jsonl", 2, 2);
  const Batch b1 = collate({&a[0], &a[1]}), b2 = collate({&b[0], &b[1]});
  auto pure_model = build_model(cfg), plain = build_model(cfg);
  load_hf_weights(*pure_model, (dir / "model").string());
  load_hf_weights(*plain, (dir / "model").string());
  PureBf16 pure(*pure_model);
  // The plain model computes fp32 gradients from the same (rounded) weights.
  for (Param& p : plain->params().all()) p.value.copy_from(pure_model->params().get(p.name).value);
  pure.begin_step();
  pure_model->forward_backward(b1, 0.01f);
  pure.end_micro_batch();
  pure_model->forward_backward(b2, 0.01f);
  pure.expose_accumulators();
  std::map<std::string, Tensor> g1;
  plain->params().zero_grad();
  plain->forward_backward(b1, 0.01f);
  for (Param& p : plain->params().all()) g1[p.name] = p.grad.clone();
  plain->params().zero_grad();
  plain->forward_backward(b2, 0.01f);
  int64_t checked = 0;
  for (Param& p : pure_model->params().all()) {
    ASSERT_EQ(p.grad.dtype(), DType::BF16) << p.name;
    for (int64_t i = 0; i < p.value.numel(); ++i)
      ASSERT_EQ(p.value.f32()[i], r16(p.value.f32()[i])) << p.name << ": not a bf16 value";
    const Tensor& g2 = plain->params().get(p.name).grad;
    const Tensor& first = g1[p.name];
    int64_t bad = 0;
    for (int64_t i = 0; i < p.grad.numel(); ++i) bad += at(p.grad, i) != r16(r16(first.f32()[i]) + g2.f32()[i]);
    EXPECT_EQ(bad, 0) << p.name;
    checked += p.grad.numel();
  }
  EXPECT_GT(checked, 1000);
}

TEST(PureBf16Training, FollowsHfBf16AndResumesExactly) {
  for (const char* c : {"llama", "qwen3", "gemma3_text"}) {
    SCOPED_TRACE(c);
    const fs::path dir = fixtures() / "golden" / c;
    const json hf = json::parse(std::ifstream(fixtures() / "golden_bf16" / c / "expected_bf16.json"))["bf16"]["steps"];
    const fs::path out = fresh_dir(std::string("pure_bf16_") + c), split = fresh_dir(std::string("pure_bf16_split_") + c);
    std::vector<StepStats> straight;
    {
      Recipe r = Recipe::load((dir / "recipe.yaml").string(), {"checkpoint.checkpoint_dir=" + out.string(), "model.dtype=bfloat16"});
      straight = Trainer(r, {.quiet = true}).train();
    }
    ASSERT_EQ(straight.size(), hf.size());
    for (size_t i = 0; i < straight.size(); ++i) {
      const double want = hf[i]["loss"];
      EXPECT_LT(std::abs(straight[i].loss - want) / want, 5e-3) << "step " << i + 1 << ": " << straight[i].loss << " vs HF bf16 " << want;
    }
    // The state was saved in bf16; the parameters are bf16 values.
    auto st = io::SafeTensors::open((out / "epoch_0_step_4/state/rank_00000-of-00001.safetensors").string());
    int64_t bf16_states = 0;
    for (const auto& n : st.names())
      if (n.rfind("exp_avg", 0) == 0) bf16_states += st.info(n).dtype == DType::BF16;
    EXPECT_GT(bf16_states, 0);
    auto cons = io::SafeTensors::open((out / "epoch_0_step_4/model/consolidated").string());
    for (const auto& n : cons.names()) {
      Tensor t = cons.get(n).to(DType::F32);
      for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(t.f32()[i], r16(t.f32()[i])) << n;
    }
    // 2 steps, then resume for the last 2: the same numbers.
    {
      Recipe r = Recipe::load((dir / "recipe.yaml").string(),
                              {"checkpoint.checkpoint_dir=" + split.string(), "model.dtype=bfloat16", "step_scheduler.ckpt_every_steps=2"});
      Trainer(r, {.quiet = true}).train();
      fs::remove(split / "LATEST");
      std::ofstream(split / "LATEST") << "epoch_0_step_2\n";
    }
    Recipe r = Recipe::load((dir / "recipe.yaml").string(), {"checkpoint.checkpoint_dir=" + split.string(), "model.dtype=bfloat16",
                                                            "checkpoint.restore_from=LATEST"});
    auto second = Trainer(r, {.quiet = true}).train();
    ASSERT_EQ(second.size(), 2u);
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ(second[i].loss, straight[2 + i].loss);
      EXPECT_EQ(second[i].grad_norm, straight[2 + i].grad_norm);
    }
  }
}

TEST(PureBf16Training, StochasticRoundingRunsAndDiffersFromNearest) {
  const fs::path dir = fixtures() / "golden/llama";
  std::vector<StepStats> nearest, sr;
  for (bool on : {false, true}) {
    Recipe r = Recipe::load((dir / "recipe.yaml").string(),
                            {"checkpoint.enabled=false", "model.dtype=bfloat16",
                             std::string("optimizer.stochastic_rounding=") + (on ? "true" : "false")});
    (on ? sr : nearest) = Trainer(r, {.quiet = true}).train();
  }
  ASSERT_EQ(sr.size(), 4u);
  EXPECT_EQ(sr[0].loss, nearest[0].loss);  // the first step's loss comes before any update
  EXPECT_NE(sr[3].loss, nearest[3].loss);
  EXPECT_LT(std::abs(sr[3].loss - nearest[3].loss) / nearest[3].loss, 5e-3);
}

}  // namespace
