#include "train/optimizer.h"

#include <cmath>

#include "core/error.h"
#include "core/hash.h"
#include "config/recipe.h"
#include "core/log.h"
#include "ops/device.h"
#include "ops/ops.h"

namespace am {

OptimizerConfig OptimizerConfig::from_recipe(const Recipe& r) {
  OptimizerConfig c;
  std::string t = r.get_string("optimizer._target_", "torch.optim.AdamW");
  std::string tail = t.substr(t.rfind('.') == std::string::npos ? 0 : t.rfind('.') + 1);
  if (tail == "AdamW" || tail == "adamw") c.kind = "adamw";
  else if (tail == "Adam" || tail == "adam") c.kind = "adam";
  else if (tail == "SGD" || tail == "sgd") c.kind = "sgd";
  else if (tail == "FusedAdam")  // Transformer Engine's: AdamW unless adam_w_mode is false (its default is true)
    c.kind = r.get_bool("optimizer.adam_w_mode", true) ? "adamw" : "adam";
  else if (tail == "FlashAdamW") {
    c.kind = "adamw";
    log::warn(r.where("optimizer._target_") + " (" + t + "): runs as torch.optim.AdamW with fp32 state "
              "(FlashAdamW's compressed state is not implemented; the update is AdamW's)");
  } else
    r.fail("optimizer._target_", "unsupported optimizer '" + t + "' (expected torch.optim.AdamW, Adam, SGD, or "
                                 "Transformer Engine's FusedAdam)");
  c.lr = r.get_double("optimizer.lr", c.kind == "sgd" ? 1e-3 : 1e-3);
  auto betas = r.get_double_list("optimizer.betas", {0.9, 0.999});
  if (betas.size() != 2) r.fail("optimizer.betas", "expected a list of two numbers");
  c.beta1 = betas[0];
  c.beta2 = betas[1];
  c.eps = r.get_double("optimizer.eps", 1e-8);
  c.weight_decay = r.get_double("optimizer.weight_decay", c.kind == "adamw" ? 0.01 : 0.0);
  c.momentum = r.get_double("optimizer.momentum", 0.0);
  c.dampening = r.get_double("optimizer.dampening", 0.0);
  c.nesterov = r.get_bool("optimizer.nesterov", false);
  c.stochastic_rounding = r.get_bool("optimizer.stochastic_rounding", false);
  if (r.get_bool("optimizer.amsgrad", false)) r.fail("optimizer.amsgrad", "amsgrad is not supported");
  // Recipe::check_values already refused nan/inf/negative lr, eps <= 0 and negative weight_decay; these
  // comparisons are written so that a NaN fails them too.
  if (!(c.lr >= 0) || !std::isfinite(c.lr)) r.fail("optimizer.lr", "must be a finite number >= 0");
  if (!(c.eps > 0) || !std::isfinite(c.eps)) r.fail("optimizer.eps", "must be a finite number > 0");
  if (!(c.weight_decay >= 0) || !std::isfinite(c.weight_decay)) r.fail("optimizer.weight_decay", "must be a finite number >= 0");
  if (!(c.beta1 >= 0 && c.beta1 < 1) || !(c.beta2 >= 0 && c.beta2 < 1)) r.fail("optimizer.betas", "each beta must be in [0, 1)");
  return c;
}

OptSlot Optimizer::slot_of(Param& p, Tensor* grad) {
  return {p.name, &p.value, grad, p.work.defined() && p.work.raw() != p.value.raw() ? &p.work : nullptr};
}

std::vector<OptSlot> Optimizer::slots_of(ParamStore& ps) {
  std::vector<OptSlot> out;
  for (auto& p : ps.all())
    if (p.trainable) out.push_back(slot_of(p, &p.grad));
  return out;
}

const Tensor* Optimizer::state(const std::string& key, int which) const {
  const auto& m = which == 0 ? m_ : v_;
  auto it = m.find(key);
  return it == m.end() || !it->second.defined() ? nullptr : &it->second;
}

void Optimizer::set_state(const std::string& key, int which, Tensor t) { (which == 0 ? m_ : v_)[key] = std::move(t); }

void Optimizer::step(ParamStore& ps, double lr, double wd) { step(slots_of(ps), lr, wd); }

AdamWHyper Optimizer::hyper(double lr, double wd) const {
  AdamWHyper h;
  h.lr = lr;
  h.beta1 = cfg_.beta1;
  h.beta2 = cfg_.beta2;
  h.eps = cfg_.eps;
  h.weight_decay = wd;
  h.step = step_;
  h.decoupled = cfg_.kind == "adamw";
  return h;
}

std::pair<Tensor*, Tensor*> Optimizer::adam_state(const OptSlot& sl, DType dt) {
  Tensor* mv[2] = {&m_[sl.key], &v_[sl.key]};
  for (Tensor* t : mv) {
    if (!t->defined()) {
      *t = ops::zeros_on(sl.value->device(), sl.value->shape(), dt);
    } else if (t->dtype() != dt) {  // read back from a checkpoint as fp32 (load_state): bf16 values convert exactly
      Tensor c = ops::empty_on(sl.value->device(), t->shape(), dt);
      ops::copy_(c, *t);
      *t = c;
    }
  }
  return {mv[0], mv[1]};
}

void Optimizer::step_cuda(const std::vector<OptSlot>& slots, double lr, double wd, const AdamWFused& fused) {
  if (cfg_.kind == "sgd") throw DeviceError("optimizer: torch.optim.SGD is not implemented on CUDA yet (use AdamW or Adam)");
  std::vector<AdamWTensors> list;
  list.reserve(slots.size());
  for (const OptSlot& sl : slots) {
    auto [m, v] = adam_state(sl, DType::F32);
    list.push_back({sl.value, sl.grad, m, v, sl.work});
  }
  ops::adamw_step_cuda(list, hyper(lr, wd), fused);
}

// model.dtype: bfloat16 (train/pure_bf16.h): bf16 gradients and state; the parameter is bf16 on the GPU and an
// fp32 tensor holding bf16 values on the host (the CPU computes in fp32). Same element math on both (ops).
void Optimizer::step_bf16(const std::vector<OptSlot>& slots, double lr, double wd, const AdamWFused& fused) {
  if (cfg_.kind == "sgd") throw UsageError("optimizer: torch.optim.SGD with model.dtype bfloat16 is not implemented (use AdamW or Adam)");
  std::vector<AdamWBf16Tensors> list;
  list.reserve(slots.size());
  for (const OptSlot& sl : slots) {
    auto [m, v] = adam_state(sl, DType::BF16);
    list.push_back({sl.value, sl.grad, m, v, fnv1a(sl.key)});
  }
  AdamWBf16Hyper h;
  static_cast<AdamWHyper&>(h) = hyper(lr, wd);
  h.stochastic = cfg_.stochastic_rounding;
  h.seed = cfg_.seed;
  ops::adamw_bf16_step(list, h, fused);
}

void Optimizer::step(const std::vector<OptSlot>& slots, double lr, double wd) {
  begin_step();
  update(slots, lr, wd);
}

void Optimizer::update(const std::vector<OptSlot>& slots, double lr, double wd, const AdamWFused& fused) {
  if (step_ < 1) throw Error("optimizer: update() before begin_step()");
  const bool is_fused = fused.d_sumsq || fused.grad_scale != 1.f;
  if (is_fused && !slots.empty() && !fuses(slots.front().value->device()))
    throw Error("optimizer: a fused update (sum of squares, scale) is CUDA AdamW / Adam's only");
  // Pure bf16: bf16 gradients, or (fused, CUDA) a bf16 value with its fp32 gradient.
  if (!slots.empty() && (slots.front().grad->dtype() == DType::BF16 || slots.front().value->dtype() == DType::BF16))
    return step_bf16(slots, lr, wd, fused);
  if (!slots.empty() && slots.front().value->device() == DeviceType::CUDA) return step_cuda(slots, lr, wd, fused);
  const float flr = static_cast<float>(lr), fwd = static_cast<float>(wd);
  for (const OptSlot& sl : slots) {
    Tensor& value = *sl.value;
    float* w = value.f32();
    const float* g = sl.grad->f32();
    const int64_t n = value.numel();
    if (cfg_.kind == "sgd") {
      Tensor* buf = nullptr;
      if (cfg_.momentum != 0.0) {
        auto it = m_.find(sl.key);
        if (it == m_.end()) it = m_.emplace(sl.key, Tensor()).first;
        buf = &it->second;
      }
      const float mom = static_cast<float>(cfg_.momentum), damp = static_cast<float>(cfg_.dampening);
      bool first = buf && !buf->defined();
      if (first) *buf = Tensor::zeros(value.shape(), DType::F32);
      float* b = buf ? buf->f32() : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        float d = g[i];
        if (wd != 0.0) d += fwd * w[i];
        if (b) {
          b[i] = first ? d : mom * b[i] + (1.f - damp) * d;
          d = cfg_.nesterov ? d + mom * b[i] : b[i];
        }
        w[i] -= flr * d;
      }
      continue;
    }
    auto [m, v] = adam_state(sl, DType::F32);
    float* mp = m->f32();
    float* vp = v->f32();
    // Scalars are rounded to float from their double values, as torch passes Python floats to its kernels.
    const float b2 = static_cast<float>(cfg_.beta2);
    const float omb1 = static_cast<float>(1.0 - cfg_.beta1), omb2 = static_cast<float>(1.0 - cfg_.beta2);
    // torch computes the bias corrections in Python floats (double), then step_size and the sqrt.
    const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(step_));
    const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(step_));
    const float step_size = static_cast<float>(lr / bc1);
    const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    const float eps = static_cast<float>(cfg_.eps);
    const bool decoupled = cfg_.kind == "adamw";
    const float decay = static_cast<float>(1.0 - lr * wd);
#pragma omp parallel for if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
      float gi = g[i];
      if (wd != 0.0) {
        if (decoupled) w[i] *= decay;
        else gi += fwd * w[i];
      }
      mp[i] += omb1 * (gi - mp[i]);  // lerp(grad, 1 - beta1)
      vp[i] = vp[i] * b2 + omb2 * gi * gi;
      const float denom = std::sqrt(vp[i]) / bc2_sqrt + eps;
      w[i] += -step_size * (mp[i] / denom);
    }
  }
}

std::vector<std::pair<std::string, Tensor>> Optimizer::state_tensors() const {
  std::vector<std::pair<std::string, Tensor>> out;
  const char* mname = cfg_.kind == "sgd" ? ".momentum_buffer" : ".exp_avg";
  for (auto& [k, t] : m_)
    if (t.defined()) out.emplace_back(k + mname, ExecContext::download(t));
  for (auto& [k, t] : v_)
    if (t.defined()) out.emplace_back(k + ".exp_avg_sq", ExecContext::download(t));
  return out;
}

void Optimizer::load_state(const std::map<std::string, Tensor>& tensors, int64_t step, const ExecContext& ex) {
  step_ = step;
  m_.clear();
  v_.clear();
  auto ends = [](const std::string& s, const std::string& suf) {
    return s.size() > suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
  };
  for (auto& [k, t] : tensors) {
    Tensor c = ex.upload(t.dtype() == DType::F32 ? t.clone() : t.to(DType::F32));
    if (ends(k, ".exp_avg_sq")) v_[k.substr(0, k.size() - 11)] = c;
    else if (ends(k, ".exp_avg")) m_[k.substr(0, k.size() - 8)] = c;
    else if (ends(k, ".momentum_buffer")) m_[k.substr(0, k.size() - 16)] = c;
    else throw FormatError("optimizer state: unexpected tensor '" + k + "'");
  }
}

}  // namespace am
