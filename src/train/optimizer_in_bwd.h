// optimizer_in_bwd: true (the recipe key torchtune uses for the same idea): every parameter unit (models/model.h
// ParamHooks: the root, then one per decoder layer) is updated by the optimizer as soon as its backward is done,
// so a unit's gradient exists only while its backward runs and no whole-model gradient is ever held:
//   fp32 master weights (the default): 4 bytes per parameter less (the fp32 gradient);
//   model.dtype bfloat16 (train/pure_bf16.h, made without accumulators): 2 bytes less (the bf16 accumulators).
// The gradients are written into fp32 scratch (train/grad_scratch.h, as pure_bf16.h): the root's own (its backward
// spans the whole pass, the LM head first and the embedding last) and one buffer of the largest layer's size,
// shared by the layers in turn. Pure bf16 rounds a unit's scratch to bf16 once (as its accumulators would) before the update.
//
// What it cannot do, checked by the trainer with exit 2: gradient accumulation (a unit's gradient must be final
// after one backward: global_batch_size == local_batch_size) and data parallelism (one rank).
// Clipping: the step's total norm is known only after the last unit is updated, so clip_grad_norm scales a step
// by the previous step's norm, coef = min(1, max_norm / (previous norm + 1e-6)); step 1 is not clipped. The
// logged grad_norm is the step's own, before clipping, as always. (torchtune refuses clipping here instead.)
// Without clipping the updates are the ordinary step's bit for bit: the update is elementwise and sees the same
// gradient values; only the norm's double sum runs in another order (per unit, in backward order). So where a
// recipe leaves the key unset it is on wherever that holds on a GPU (train/trainer.h optimizer_in_bwd_is_exact).
// On CUDA (AdamW / Adam) a unit's update is one pass over its fp32 scratch (core/adamw_params.h AdamWFused): the
// sum of squares, the clip scale and (pure bf16) the rounding to bf16 are taken as the update reads the gradient,
// with no bf16 gradient buffer; elsewhere they are separate passes, with the same numbers.
#pragma once
#include <vector>

#include "models/model.h"
#include "ops/device.h"
#include "train/grad_scratch.h"
#include "train/optimizer.h"

namespace am {

class OptimizerInBackward : public ParamHooks {
 public:
  // The model's parameters must be on their device (after CausalLM::to_device and, for bf16, after PureBf16 made
  // them bf16). bf16: the gradients are rounded to bf16 for the bf16 AdamW (pure bf16). Sets the model's hooks.
  OptimizerInBackward(CausalLM& model, Optimizer& opt, bool bf16);
  ~OptimizerInBackward() override;

  // Opens a step: the optimizer counts it; every unit's update uses lr, wd and the clip coefficient (1: none).
  void begin_step(double lr, double wd, double clip_coef);
  // Closes it: the sum of squares of all the step's gradients (before clipping). Every unit must have been
  // updated (a unit whose backward did not run is an error: its parameters would silently skip a step).
  double end_step();

  void before_use(int unit, bool backward) override;
  void after_forward(int unit) override {}
  void after_backward(int unit) override;

 private:
  CausalLM& model_;
  Optimizer& opt_;
  bool bf16_;
  bool fused_ = false;                      // the update takes its sum of squares, scale and rounding itself (CUDA AdamW)
  UnitGradScratch scratch_;                 // the fp32 gradient while a unit's backward runs
  Tensor bf16_scratch_;                     // pure bf16: bf16 [largest unit's numel], the rounded gradient
  double lr_ = 0, wd_ = 0, coef_ = 1;
  ops::SquareSums sums_;                    // the step's per-unit sums of squares (its grad norm)
  bool open_ = false;
  std::vector<char> updated_;  // per unit, in the open step
};

}  // namespace am
