// Shared by the GPU tests (tests/gpu/*.cpp): device detection, host/device tensor moves, poisoned outputs,
// tolerance checks against the CPU reference, and the "train a fixture on CPU and on CUDA" comparison.
// Header-only; everything in am::gpu_test. A test file pulls in what it uses with using-declarations.
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "config/recipe.h"
#include "core/tensor.h"
#include "data/dataset.h"
#include "../common/tolerance.h"
#include "io/model_config.h"
#include "models/decoder.h"
#include "models/hf_weights.h"
#include "models/model.h"
#include "ops/ops.h"
#include "train/trainer.h"

namespace am::gpu_test {

inline bool have_device() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();
  return ok;
}
#define AM_REQUIRE_DEVICE() \
  if (!::am::gpu_test::have_device()) GTEST_SKIP() << "no CUDA device visible"

inline const float kNaN = std::numeric_limits<float>::quiet_NaN();

// Host fp32 tensor, uniform in [lo, hi), rounded to dt (so the CPU reference sees exactly the values the device
// sees).
inline Tensor rand_host(const Shape& s, std::mt19937& rng, DType dt = DType::F32, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::empty(s, DType::F32);
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = u(rng);
  return dt == DType::F32 ? t : t.to(dt).to(DType::F32);
}

// Host -> device as dt (int32 tensors go as they are); device -> host as fp32 (int32 stays int32).
inline Tensor up(const Tensor& host, DType dt) {
  return cuda::to_device(dt == DType::F32 || host.dtype() == DType::I32 ? host : host.to(dt));
}
inline Tensor down(const Tensor& dev) {
  Tensor h = cuda::to_host(dev);
  return h.dtype() == DType::F32 || h.dtype() == DType::I32 ? h : h.to(DType::F32);
}

// A device output filled with NaN (int32: -1), so an element the kernel forgets to write fails the check.
inline Tensor poisoned(const Shape& s, DType dt) {
  Tensor t = cuda::empty(s, dt);
  if (dt == DType::I32)
    cudaMemset(t.raw(), 0xff, t.nbytes());
  else
    cuda::fill_(t, kNaN);
  return t;
}

// got (device or host, any float dtype) against want (host fp32): every element within
// atol * max(1, rms(want)) + rtol * |want|, none non-finite, and the relative L2 error within rel_l2_budget.
inline void expect_close(const Tensor& got_any, const Tensor& want, test::Tolerance tol, double rel_l2_budget,
                         const std::string& what) {
  Tensor got = got_any.device() == DeviceType::CUDA ? down(got_any) : got_any;
  if (got.dtype() != DType::F32) got = got.to(DType::F32);
  ASSERT_EQ(got.numel(), want.numel()) << what;
  const int64_t n = want.numel();
  double den = 0, num = 0, max_abs = 0;
  for (int64_t i = 0; i < n; ++i) den += double(want.f32()[i]) * want.f32()[i];
  const double rms = n ? std::sqrt(den / n) : 0.0, atol = tol.atol * std::max(1.0, rms);
  int64_t bad = 0, nonfinite = 0, first = -1;
  for (int64_t i = 0; i < n; ++i) {
    const double g = got.f32()[i], w = want.f32()[i];
    if (!std::isfinite(g)) {
      if (++nonfinite == 1 && first < 0) first = i;
      continue;
    }
    const double d = std::abs(g - w);
    num += d * d;
    max_abs = std::max(max_abs, d);
    if (d > atol + tol.rtol * std::abs(w) && ++bad == 1 && first < 0) first = i;
  }
  const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  EXPECT_EQ(nonfinite, 0) << what << ": non-finite element, first at " << first;
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << n << " outside tolerance, first at " << first << " (got "
                    << (first >= 0 ? got.f32()[first] : 0.f) << ", want " << (first >= 0 ? want.f32()[first] : 0.f)
                    << "), max abs err " << max_abs;
  EXPECT_LE(rel, rel_l2_budget) << what << ": relative L2 error";
}
// The same with the tolerance of dt's rounding (test_tolerance.h) and a relative L2 budget of 1e-5 (fp32) / 1e-2.
inline void expect_close_dt(const Tensor& got, const Tensor& want, DType dt, const std::string& what) {
  expect_close(got, want, test::tolerance(dt), dt == DType::F32 ? 1e-5 : 1e-2, what);
}

// Trains a fixture folder's recipe.yaml (with the overrides `extra`) on `device`; returns its step stats.
inline std::vector<StepStats> train_fixture(const std::filesystem::path& dir, const std::string& device,
                                            std::vector<std::string> extra) {
  extra.push_back("device=" + device);
  extra.push_back("checkpoint.enabled=false");
  Recipe r = Recipe::load((dir / "recipe.yaml").string(), extra);
  Trainer t(r, TrainerOptions{.quiet = true});
  EXPECT_EQ(t.device_name(), device);
  return t.train();
}

// One rank's CPU run is the oracle for the CUDA run of the same fixture: same label counts, loss within 1% and
// grad norm within 5% at every step (bf16 compute on CUDA, fp32 on the CPU).
inline void compare_cpu_cuda_training(const std::filesystem::path& dir, const std::vector<std::string>& extra,
                                      const std::string& tag, size_t expect_steps = 4) {
  const auto cpu = train_fixture(dir, "cpu", extra), gpu = train_fixture(dir, "cuda", extra);
  ASSERT_EQ(cpu.size(), gpu.size());
  ASSERT_EQ(cpu.size(), expect_steps);
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double l = cpu[i].loss, gn = cpu[i].grad_norm;
    std::printf("[%s] step %zu loss cpu %.6f cuda %.6f (rel %.2e) grad_norm cpu %.5f cuda %.5f (rel %.2e)\n", tag.c_str(),
                i + 1, l, gpu[i].loss, std::abs(gpu[i].loss - l) / l, gn, gpu[i].grad_norm,
                std::abs(gpu[i].grad_norm - gn) / gn);
    EXPECT_EQ(gpu[i].num_label_tokens, cpu[i].num_label_tokens) << tag << " step " << i + 1;
    EXPECT_NEAR(gpu[i].loss, l, 0.01 * l) << tag << " step " << i + 1;
    EXPECT_NEAR(gpu[i].grad_norm, gn, 0.05 * gn) << tag << " step " << i + 1;
  }
  std::fflush(stdout);
}

// Relative L2 distance of b's gradients from a's: over all parameters, and per parameter (worst first).
inline double grad_distance(CausalLM& a, CausalLM& b, std::vector<std::pair<double, std::string>>* per_param) {
  double num_all = 0, den_all = 0;
  for (Param& p : a.params().all()) {
    if (!p.grad.defined()) continue;
    const Tensor want = ExecContext::download(p.grad);
    const Tensor got = ExecContext::download(b.params().get(p.name).grad);
    EXPECT_EQ(got.numel(), want.numel()) << p.name;
    if (got.numel() != want.numel()) continue;
    double num = 0, den = 0;
    for (int64_t i = 0; i < want.numel(); ++i) {
      const double d = double(got.f32()[i]) - want.f32()[i];
      num += d * d;
      den += double(want.f32()[i]) * want.f32()[i];
    }
    num_all += num;
    den_all += den;
    if (per_param) per_param->emplace_back(den > 0 ? std::sqrt(num / den) : std::sqrt(num), p.name);
  }
  if (per_param) std::sort(per_param->rbegin(), per_param->rend());
  return den_all > 0 ? std::sqrt(num_all / den_all) : 0.0;
}

// One forward_backward of a model from the same HF weights on three models: the CPU in fp32 (the oracle), CUDA in bf16,
// and the CPU again with every weight rounded to bf16 (fp32 compute). The third says how sensitive this fixture's
// gradients are to bf16 noise at all: a tiny random model with near-tied routing can move 10% and more under weight
// rounding alone, which no bf16 implementation avoids, so bounds scale with it.
struct Step1Gradients {
  double ce_cpu = 0, ce_gpu = 0;
  double aux_cpu = 0, aux_gpu = 0;                        // the router aux loss (coef x loss; 0 without one)
  double rel_all = 0;                                    // CUDA against the fp32 CPU, all parameters
  std::vector<std::pair<double, std::string>> per_param;  // CUDA against the fp32 CPU, worst first
  double sens_all = 0;                                    // bf16-rounded CPU against the fp32 CPU
  std::vector<std::pair<double, std::string>> sens_per_param;
  double rel_rounded_all = 0;  // CUDA against the bf16-rounded CPU (same weight rounding; activations differ)
  std::vector<std::pair<double, std::string>> rounded_per_param;
  double sens_of(const std::string& name) const {
    for (const auto& [r, n] : sens_per_param)
      if (n == name) return r;
    return 0.0;
  }
};

inline Step1Gradients step1_gradients(const io::ModelConfig& cfg, const std::filesystem::path& model_dir,
                                      const Batch& host_batch) {
  auto cpu = build_model(cfg), gpu = build_model(cfg), rounded = build_model(cfg);
  for (auto* m : {&cpu, &gpu, &rounded}) load_hf_weights(**m, model_dir.string());
  for (Param& p : rounded->params().all()) {
    Tensor b = Tensor::empty(p.value.shape(), DType::BF16);
    ops::copy_(b, p.value);
    ops::copy_(p.value, b);
  }
  gpu->to_device(ExecContext::cuda_bf16());
  for (auto* m : {&cpu, &gpu, &rounded}) (*m)->params().zero_grad();
  ForwardOptions fo;
  Step1Gradients r;
  r.ce_cpu = cpu->forward_backward(host_batch, 1.0f, fo);
  r.ce_gpu = gpu->forward_backward(upload_batch(host_batch, gpu->exec()), 1.0f, fo);
  rounded->forward_backward(host_batch, 1.0f, fo);
  r.aux_cpu = cpu->take_aux_loss();
  r.aux_gpu = gpu->take_aux_loss();
  r.rel_all = grad_distance(*cpu, *gpu, &r.per_param);
  r.sens_all = grad_distance(*cpu, *rounded, &r.sens_per_param);
  r.rel_rounded_all = grad_distance(*rounded, *gpu, &r.rounded_per_param);
  return r;
}

// Sets an environment variable for the scope (value nullptr: unsets it), restoring the old value after.
struct ScopedEnv {
  std::string name, old;
  bool had;
  ScopedEnv(const char* n, const char* v) : name(n) {
    const char* o = std::getenv(n);
    had = o != nullptr;
    if (had) old = o;
    if (v) setenv(n, v, 1);
    else unsetenv(n);
  }
  ~ScopedEnv() {
    if (had) setenv(name.c_str(), old.c_str(), 1);
    else unsetenv(name.c_str());
  }
};

}  // namespace am::gpu_test
