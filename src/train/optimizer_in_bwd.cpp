#include "train/optimizer_in_bwd.h"

#include <algorithm>
#include <string>

#include "core/error.h"
#include "ops/device.h"
#include "ops/ops.h"

namespace am {

OptimizerInBackward::OptimizerInBackward(CausalLM& model, Optimizer& opt, bool bf16)
    : model_(model), opt_(opt), bf16_(bf16) {
  const DeviceType dev = model.exec().on_cuda() ? DeviceType::CUDA : DeviceType::CPU;
  auto all = model.param_units();
  units_.resize(all.size());
  int64_t root_n = 0, layer_max = 0;
  for (size_t u = 0; u < all.size(); ++u) {
    int64_t n = 0;
    for (Param* p : all[u]) {
      if (!p->trainable) continue;
      units_[u].push_back(p);
      n += shape_numel(p->shape);
      p->grad = Tensor();  // the whole-model gradient goes; scratch views stand in while a unit's backward runs
    }
    if (u == 0) root_n = n;
    else layer_max = std::max(layer_max, n);
  }
  root_scratch_ = ops::zeros_on(dev, {std::max<int64_t>(root_n, 1)}, DType::F32);
  layer_scratch_ = ops::zeros_on(dev, {std::max<int64_t>(layer_max, 1)}, DType::F32);
  if (bf16_) bf16_scratch_ = ops::empty_on(dev, {std::max<int64_t>(std::max(root_n, layer_max), 1)}, DType::BF16);
  for (size_t u = 0; u < units_.size(); ++u) point_at_scratch(static_cast<int>(u));
  updated_.assign(units_.size(), 0);
  model_.set_param_hooks(this);
}

OptimizerInBackward::~OptimizerInBackward() { model_.set_param_hooks(nullptr); }

// Unit u's gradients as views of its (zeroed) fp32 scratch: the root's own, or the one layer buffer.
void OptimizerInBackward::point_at_scratch(int unit) {
  Tensor& s = unit == 0 ? root_scratch_ : layer_scratch_;
  int64_t off = 0;
  for (Param* p : units_[static_cast<size_t>(unit)]) {
    const int64_t n = shape_numel(p->shape);
    p->grad = s.slice_rows(off, off + n).view(p->shape);
    off += n;
  }
}

void OptimizerInBackward::begin_step(double lr, double wd, double clip_coef) {
  opt_.begin_step();
  lr_ = lr;
  wd_ = wd;
  coef_ = clip_coef;
  sums_.total();  // drop anything a failed step left
  open_ = true;
  std::fill(updated_.begin(), updated_.end(), 0);
}

double OptimizerInBackward::end_step() {
  open_ = false;
  for (size_t u = 0; u < units_.size(); ++u)
    if (!units_[u].empty() && !updated_[u])
      throw Error("optimizer_in_bwd: parameter unit " + std::to_string(u) + " (" + units_[u].front()->name +
                  ", ...) got no backward in this step, so it was not updated");
  return sums_.total();
}

void OptimizerInBackward::before_use(int unit, bool backward) {
  // The root's gradients are written from the LM head's backward on, before any backward hook: point them at
  // their scratch when the micro-batch starts (its forward's first hook). A layer's, when its backward starts
  // (the layers share one buffer).
  if (unit == 0 ? !backward : backward) point_at_scratch(unit);
}

void OptimizerInBackward::after_backward(int unit) {
  const auto& ps = units_.at(static_cast<size_t>(unit));
  if (!open_ || ps.empty()) return;
  if (updated_[static_cast<size_t>(unit)])
    throw Error("optimizer_in_bwd: a second backward of parameter unit " + std::to_string(unit) +
                " in one step (gradient accumulation is not possible here)");
  // The gradients the update reads: the fp32 scratch views, or (pure bf16) their one rounding to bf16.
  std::vector<Tensor> grads;
  grads.reserve(ps.size());
  int64_t off = 0;
  for (Param* p : ps) {
    if (!bf16_) {
      grads.push_back(p->grad);
      continue;
    }
    const int64_t n = shape_numel(p->shape);
    Tensor g = bf16_scratch_.slice_rows(off, off + n).view(p->shape);
    ops::copy_(g, p->grad);
    grads.push_back(g);
    off += n;
  }
  std::vector<const Tensor*> gp;
  for (const Tensor& g : grads) gp.push_back(&g);
  sums_.add(gp);  // no host sync: read back once, at end_step
  if (coef_ < 1.0)
    for (Tensor& g : grads) ops::scale_(g, static_cast<float>(coef_));
  std::vector<OptSlot> slots;
  slots.reserve(ps.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    Param* p = ps[i];
    // As Optimizer::slots_of: the working copy is refreshed where it is not the master itself.
    slots.push_back({p->name, &p->value, &grads[i], p->work.defined() && p->work.raw() != p->value.raw() ? &p->work : nullptr});
  }
  opt_.update(slots, lr_, wd_);
  // The scratch is zeroed for its next user (gradients accumulate into it).
  Tensor& s = unit == 0 ? root_scratch_ : layer_scratch_;
  int64_t used = 0;
  for (Param* p : ps) used += shape_numel(p->shape);
  Tensor head = s.slice_rows(0, used);
  ops::zero_(head);
  updated_[static_cast<size_t>(unit)] = 1;
}

}  // namespace am
