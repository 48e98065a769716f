#include "train/grad_scratch.h"

#include <algorithm>

#include "ops/device.h"
#include "ops/ops.h"

namespace am {

UnitGradScratch::UnitGradScratch(CausalLM& model) {
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
      p->grad = Tensor();
    }
    if (u == 0) root_n = n;
    else layer_max = std::max(layer_max, n);
  }
  root_ = ops::zeros_on(dev, {std::max<int64_t>(root_n, 1)}, DType::F32);
  layer_ = ops::zeros_on(dev, {std::max<int64_t>(layer_max, 1)}, DType::F32);
}

int64_t UnitGradScratch::largest_unit() const { return std::max(root_.numel(), layer_.numel()); }

void UnitGradScratch::point_at(int unit) {
  Tensor& s = unit == 0 ? root_ : layer_;
  int64_t off = 0;
  for (Param* p : units_.at(static_cast<size_t>(unit))) {
    const int64_t n = shape_numel(p->shape);
    p->grad = s.slice_rows(off, off + n).view(p->shape);
    off += n;
  }
}

void UnitGradScratch::clear(int unit) {
  int64_t used = 0;
  for (Param* p : units_.at(static_cast<size_t>(unit))) used += shape_numel(p->shape);
  Tensor head = (unit == 0 ? root_ : layer_).slice_rows(0, used);
  ops::zero_(head);
}

}  // namespace am
