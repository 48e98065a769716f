#include "train/pure_bf16.h"

#include "ops/device.h"
#include "ops/ops.h"

namespace am {

PureBf16::PureBf16(CausalLM& model, bool accumulators) : model_(model), accumulators_(accumulators) {
  const DeviceType dev = model.exec().on_cuda() ? DeviceType::CUDA : DeviceType::CPU;
  for (const auto& all : model.param_units()) {
    std::vector<Param*> trainable;
    for (Param* p : all)
      if (p->trainable) trainable.push_back(p);
    units_.push_back(std::move(trainable));
  }
  for (auto& ps : units_)
    for (Param* p : ps) {
      if (dev == DeviceType::CUDA) {
        // The bf16 working copy (what forward and backward read) becomes the parameter; the fp32 master goes.
        if (p->work.dtype() != DType::BF16) {
          Tensor b = ops::empty_on(dev, p->value.shape(), DType::BF16);
          ops::copy_(b, p->value);
          p->work = b;
        }
        p->value = p->work;
      } else {
        // The CPU computes in fp32: the parameter stays an fp32 tensor, holding bf16 values from here on
        // (round_values below).
        p->work = p->value;
      }
      p->grad = Tensor();  // the fp32 gradient: replaced by scratch views (backward) and the accumulator
    }
  round_values();
  if (!accumulators) return;  // optimizer_in_bwd owns the gradients (train/optimizer_in_bwd.h)
  acc_.resize(units_.size());
  for (size_t u = 0; u < units_.size(); ++u)
    for (Param* p : units_[u]) acc_[u].push_back(ops::zeros_on(dev, p->value.shape(), DType::BF16));
  scratch_ = UnitGradScratch(model);
  expose_accumulators();
  model_.set_param_hooks(this);
}

PureBf16::~PureBf16() {
  if (accumulators_) model_.set_param_hooks(nullptr);
}

void PureBf16::round_values() {
  for (auto& ps : units_)
    for (Param* p : ps) ops::round_to_bf16_values_(p->value);
}

void PureBf16::begin_step() { assign_ = true; }
void PureBf16::end_micro_batch() { assign_ = false; }

void PureBf16::expose_accumulators() {
  for (size_t u = 0; u < units_.size(); ++u)
    for (size_t i = 0; i < units_[u].size(); ++i) units_[u][i]->grad = acc_[u][i];
}

void PureBf16::before_use(int unit, bool backward) {
  // The root's gradients are written from the LM head's backward on, before any backward hook: point them at
  // their scratch when the micro-batch starts (its forward's first hook). A layer's, when its backward starts.
  if (UnitGradScratch::starts_gradient(unit, backward)) scratch_.point_at(unit);
}

void PureBf16::after_backward(int unit) {
  auto& ps = units_[static_cast<size_t>(unit)];
  if (ps.empty()) return;
  auto& acc = acc_[static_cast<size_t>(unit)];
  for (size_t i = 0; i < ps.size(); ++i) {
    if (assign_) ops::copy_(acc[i], ps[i]->grad);  // one rounding to bf16
    else ops::add_(acc[i], ps[i]->grad);           // acc + g in fp32, one rounding
  }
  scratch_.clear(unit);
}

}  // namespace am
