#include "train/optimizer_in_bwd.h"

#include <algorithm>
#include <string>

#include "core/error.h"
#include "ops/device.h"
#include "ops/ops.h"

namespace am {

OptimizerInBackward::OptimizerInBackward(CausalLM& model, Optimizer& opt, bool bf16)
    : model_(model), opt_(opt), bf16_(bf16), scratch_(model) {
  const DeviceType dev = model.exec().on_cuda() ? DeviceType::CUDA : DeviceType::CPU;
  fused_ = opt_.fuses(dev);
  // The bf16 rounding of a unit's gradient needs a buffer only where the update cannot round as it reads
  // (not CUDA AdamW / Adam): W2's largest unit makes it 1.2 GB.
  if (bf16_ && !fused_)
    bf16_scratch_ = ops::empty_on(dev, {std::max<int64_t>(scratch_.largest_unit(), 1)}, DType::BF16);
  updated_.assign(scratch_.units().size(), 0);
  model_.set_param_hooks(this);
}

OptimizerInBackward::~OptimizerInBackward() { model_.set_param_hooks(nullptr); }

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
  const auto& units = scratch_.units();
  for (size_t u = 0; u < units.size(); ++u)
    if (!units[u].empty() && !updated_[u])
      throw Error("optimizer_in_bwd: parameter unit " + std::to_string(u) + " (" + units[u].front()->name +
                  ", ...) got no backward in this step, so it was not updated");
  return sums_.total();
}

void OptimizerInBackward::before_use(int unit, bool backward) {
  // The root's gradients are written from the LM head's backward on, before any backward hook: point them at
  // their scratch when the micro-batch starts (its forward's first hook). A layer's, when its backward starts
  // (the layers share one buffer).
  if (UnitGradScratch::starts_gradient(unit, backward)) scratch_.point_at(unit);
}

void OptimizerInBackward::after_backward(int unit) {
  const auto& ps = scratch_.unit(unit);
  if (!open_ || ps.empty()) return;
  if (updated_[static_cast<size_t>(unit)])
    throw Error("optimizer_in_bwd: a second backward of parameter unit " + std::to_string(unit) +
                " in one step (gradient accumulation is not possible here)");
  // The gradients the update reads. CUDA AdamW / Adam (fused_): the fp32 scratch views themselves; one pass takes
  // their sum of squares, scales them by the clip coefficient and (pure bf16) rounds them to bf16 as it loads them
  // (AdamWFused, core/adamw_params.h). Elsewhere those are separate passes here, with the same numbers: the rounding
  // into bf16_scratch_, the sum of squares, the scale.
  std::vector<Tensor> grads;
  grads.reserve(ps.size());
  AdamWFused fused;
  if (fused_) {
    for (Param* p : ps) grads.push_back(p->grad);
    fused = AdamWFused{static_cast<float>(coef_), sums_.device_slot()};
  } else {
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
  }
  std::vector<OptSlot> slots;
  slots.reserve(ps.size());
  for (size_t i = 0; i < ps.size(); ++i) slots.push_back(Optimizer::slot_of(*ps[i], &grads[i]));
  opt_.update(slots, lr_, wd_, fused);
  scratch_.clear(unit);  // zeroed for its next user (gradients accumulate into it)
  updated_[static_cast<size_t>(unit)] = 1;
}

}  // namespace am
