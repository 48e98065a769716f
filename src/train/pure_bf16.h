// model.dtype: bfloat16 (SPEC "Precision"): parameters, gradients and optimizer state in bf16, as HF and
// AutoModel train a model loaded in bf16 (torch_dtype: bfloat16), for half the memory of fp32 masters.
//
//   parameters  the bf16 working copy is the parameter (no fp32 master); on the CPU, which computes in fp32, an
//               fp32 tensor holding bf16 values (rounded at setup and by every update), so the CPU path is the
//               oracle of the GPU one.
//   gradients   bf16 accumulators [numel] per parameter. The backward ops write fp32 gradients (they accumulate
//               in fp32 by contract), so each unit's gradients go to an fp32 scratch that lives only while the
//               unit's backward runs (train/grad_scratch.h): one decoder layer's worth, shared by the
//               layers, plus the root unit (embeddings, final norm, LM head), whose backward spans the whole
//               pass. When a unit's backward ends its scratch is added into the accumulators with one rounding
//               (the first micro-batch of a step assigns) and zeroed. HF rounds each micro-batch's gradient to
//               bf16 and then the sum (two roundings); the single rounding here is the closer of the two to the
//               exact sum.
//   state       exp_avg / exp_avg_sq bf16 (train/optimizer.cpp step_bf16, backend/cpu/adamw_bf16.h).
// Between steps (grad norm, clipping, the optimizer, checkpoints) every Param::grad is its bf16 accumulator.
// Not with LoRA (its base is frozen in its dtype already) or data parallelism (the trainer keeps fp32 masters
// there and says so).
#pragma once
#include <vector>

#include "models/model.h"
#include "train/grad_scratch.h"

namespace am {

class PureBf16 : public ParamHooks {
 public:
  // The model's parameters must be on their device (after CausalLM::to_device), trainable ones with their fp32
  // values; they become bf16 here. The model's hooks are set to this object. accumulators = false: only the
  // parameters are made bf16; the gradients are left to optimizer_in_bwd (train/optimizer_in_bwd.h), which
  // updates each unit from its fp32 scratch rounded to bf16, so no whole-model bf16 gradient exists; then none
  // of the methods below may be called but round_values.
  explicit PureBf16(CausalLM& model, bool accumulators = true);
  ~PureBf16() override;

  void begin_step();       // the next micro-batch assigns the accumulators
  void end_micro_batch();  // the ones after it add
  // Param::grad of every trainable parameter = its bf16 accumulator (after the last micro-batch of a step).
  void expose_accumulators();
  // Rounds the parameters to bf16 values where they are fp32 storage (the host), e.g. after a checkpoint of an
  // fp32-master run was read into them. No-op on CUDA, where they are bf16 tensors.
  void round_values();

  void before_use(int unit, bool backward) override;
  void after_forward(int unit) override {}
  void after_backward(int unit) override;

 private:
  CausalLM& model_;
  bool accumulators_ = true;
  std::vector<std::vector<Param*>> units_;  // trainable parameters per unit
  std::vector<std::vector<Tensor>> acc_;    // bf16 accumulators, per unit, per parameter
  UnitGradScratch scratch_;                 // the fp32 gradient while a unit's backward runs
  bool assign_ = true;
};

}  // namespace am
