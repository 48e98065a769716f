#include "train/pure_bf16.h"

#include <algorithm>

#include "ops/device.h"
#include "ops/ops.h"

namespace am {

PureBf16::PureBf16(CausalLM& model, bool accumulators) : model_(model), accumulators_(accumulators) {
  const ExecContext& ex = model.exec();
  const DeviceType dev = ex.on_cuda() ? DeviceType::CUDA : DeviceType::CPU;
  auto all = model.param_units();
  units_.resize(all.size());
  acc_.resize(all.size());
  int64_t root_n = 0, layer_max = 0;
  for (size_t u = 0; u < all.size(); ++u) {
    int64_t n = 0;
    for (Param* p : all[u]) {
      if (!p->trainable) continue;
      units_[u].push_back(p);
      n += p->value.defined() ? p->value.numel() : p->work.numel();
    }
    if (u == 0) root_n = n;
    else layer_max = std::max(layer_max, n);
  }
  for (size_t u = 0; u < units_.size(); ++u)
    for (Param* p : units_[u]) {
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
      if (accumulators) acc_[u].push_back(ops::zeros_on(dev, p->value.shape(), DType::BF16));
    }
  round_values();
  if (!accumulators) return;  // optimizer_in_bwd owns the gradients (train/optimizer_in_bwd.h)
  root_scratch_ = ops::zeros_on(dev, {std::max<int64_t>(root_n, 1)}, DType::F32);
  layer_scratch_ = ops::zeros_on(dev, {std::max<int64_t>(layer_max, 1)}, DType::F32);
  for (size_t u = 0; u < units_.size(); ++u) point_at_scratch(static_cast<int>(u));
  expose_accumulators();
  model_.set_param_hooks(this);
}

PureBf16::~PureBf16() {
  if (accumulators_) model_.set_param_hooks(nullptr);
}

void PureBf16::round_values() {
  for (auto& ps : units_)
    for (Param* p : ps)
      if (p->value.dtype() == DType::F32) {
        Tensor b = ops::empty_on(p->value.device(), p->value.shape(), DType::BF16);
        ops::copy_(b, p->value);
        ops::copy_(p->value, b);
      }
}

void PureBf16::begin_step() { assign_ = true; }
void PureBf16::end_micro_batch() { assign_ = false; }

void PureBf16::expose_accumulators() {
  for (size_t u = 0; u < units_.size(); ++u)
    for (size_t i = 0; i < units_[u].size(); ++i) units_[u][i]->grad = acc_[u][i];
}

// Unit u's gradients as views of its (zeroed) fp32 scratch: the root's own, or the one layer buffer.
void PureBf16::point_at_scratch(int unit) {
  Tensor& s = unit == 0 ? root_scratch_ : layer_scratch_;
  const auto& ps = units_[static_cast<size_t>(unit)];
  const auto& acc = acc_[static_cast<size_t>(unit)];
  int64_t off = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    const int64_t n = acc[i].numel();
    ps[i]->grad = s.slice_rows(off, off + n).view(acc[i].shape());
    off += n;
  }
}

void PureBf16::before_use(int unit, bool backward) {
  // The root's gradients are written from the LM head's backward on, before any backward hook: point them at
  // their scratch when the micro-batch starts (its forward's first hook). A layer's, when its backward starts.
  if (unit == 0 ? !backward : backward) point_at_scratch(unit);
}

void PureBf16::after_backward(int unit) {
  auto& ps = units_[static_cast<size_t>(unit)];
  if (ps.empty()) return;
  auto& acc = acc_[static_cast<size_t>(unit)];
  int64_t used = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    if (assign_) ops::copy_(acc[i], ps[i]->grad);  // one rounding to bf16
    else ops::add_(acc[i], ps[i]->grad);           // acc + g in fp32, one rounding
    used += ps[i]->grad.numel();
  }
  Tensor& s = unit == 0 ? root_scratch_ : layer_scratch_;
  Tensor head = s.slice_rows(0, used);
  ops::zero_(head);
}

}  // namespace am
