// fp32 gradient scratch per parameter unit (models/model.h ParamHooks: the root, then one per decoder layer), for
// the modes whose gradients must not live in one whole-model buffer: pure bf16 (train/pure_bf16.h, which rounds
// a unit's scratch into its bf16 accumulators) and optimizer_in_bwd (train/optimizer_in_bwd.h, which updates the
// unit from it). The backward ops accumulate fp32 gradients into Param::grad by contract, so while a unit's
// backward runs its trainable parameters' grads are views of a zeroed fp32 buffer:
//   the root's own [root numel]   its backward spans the whole pass (the LM head first, the embedding last);
//   one layer buffer [largest layer's numel], shared by the layers in turn.
// Hook rule (both users): point the root at its scratch when a micro-batch starts (its forward's first hook:
// before_use(0, false)), a layer when its backward starts (before_use(i, true)); when the unit's backward is done
// and its gradient consumed, clear() zeroes the part used for the next user.
#pragma once
#include <vector>

#include "models/model.h"

namespace am {

class UnitGradScratch {
 public:
  UnitGradScratch() = default;
  // The trainable parameters of each of the model's units; the buffers on the model's device. Clears every
  // trainable Param::grad (the scratch views stand in from point_at on).
  explicit UnitGradScratch(CausalLM& model);

  const std::vector<std::vector<Param*>>& units() const { return units_; }
  const std::vector<Param*>& unit(int u) const { return units_.at(static_cast<size_t>(u)); }
  int64_t largest_unit() const;  // elements of the largest unit (root or layer)
  // ParamHooks::before_use's rule above: true when the hook (unit, backward) starts the unit's gradient.
  static bool starts_gradient(int unit, bool backward) { return unit == 0 ? !backward : backward; }
  // Unit u's trainable parameters' grads as views of its scratch.
  void point_at(int unit);
  // Zeroes the part of unit u's scratch its parameters use.
  void clear(int unit);

 private:
  std::vector<std::vector<Param*>> units_;
  Tensor root_, layer_;  // fp32 [root numel], [largest layer's numel]
};

}  // namespace am
