// LoRA (HF PEFT's LoraLayer, NeMo AutoModel's LinearLoRA) on a frozen Linear, and the projection every block
// uses so that one code path serves plain and adapted weights:
//   y = x W^T (+ b) + s * drop_pre(x) A^T B^T                 dropout_position "pre" (HF PEFT)
//   y = x W^T (+ b) + drop_post(s * x A^T B^T)                dropout_position "post" (AutoModel's default)
//   x [N, in], W [out, in], A [r, in], B [out, r], s = alpha / r (or alpha / sqrt(r): rsLoRA)
// Dropout is active only in training passes (LoraPass::training); its mask is a pure function of
// (pass seed, adapter key, element index) (ops::dropout_), so backward and activation-checkpointing
// recomputation see the same mask without storing it.
// Memory: forward keeps nothing beyond what the block keeps anyway (x); backward recomputes u = x A^T
// [N, r] (r << in: ~r/out of the base GEMM's work).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/exec.h"
#include "models/params.h"

namespace am {

// What the current pass is: set by the model at the start of each forward.
struct LoraPass {
  bool training = false;  // dropout on (forward_backward) or off (validation, logits, generate)
  uint64_t seed = 0;      // per (run seed, step, micro-batch): ForwardOptions::dropout_seed
};

// Linear: A [r, in], B [out, r] (PEFT's own layout). Grouped (MoE experts, one pair per expert on a fused
// [E, out, in] parameter): A [E, r, in] (= PEFT's ParamWrapper lora_A [r·E, in], row e·r + k: the same
// memory) and B [E, out, r] (PEFT's lora_B is [out, r·E] with column k·E + e: permuted on save and load).
struct LoraAdapter {
  std::string module;      // HF module path, e.g. "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts"
  std::string param;       // grouped: the fused parameter, "gate_up_proj" | "down_proj"; else ""
  bool grouped = false;
  int64_t rank = 0;
  double alpha = 0;        // lora_alpha of this pair (PEFT's alpha_pattern may differ from the section's)
  Param* A = nullptr;      // "base_model.model.<module>[.base_layer].lora_A.weight"
  Param* B = nullptr;      // "base_model.model.<module>[.base_layer].lora_B.weight"
  float scale = 1.f;       // alpha / r or alpha / sqrt(r)
  float dropout = 0.f;     // probability
  bool dropout_post = true;  // AutoModel "post": drop the LoRA branch's output; false: its input (PEFT)
  uint64_t key = 0;        // per-module salt of the dropout seed (hash of the module name)
  const LoraPass* pass = nullptr;  // the owning model's current pass
};

// y = x W^T (+ b) (+ the LoRA branch when w.lora). x [N, in], y [N, out] (assigned).
// accumulate: y += that instead (a block output added straight into the residual stream). CUDA: the base GEMM and
// the branch's last GEMM accumulate in place (beta = 1, LinearOut). CPU: bit-identical to proj_fwd into a
// temporary followed by ops::add_ (with a LoRA pair: base + branch in the temporary first, the reference's order).
void proj_fwd(const ExecContext& ex, const Param& w, const Param* b, const Tensor& x, Tensor& y,
              bool accumulate = false);
// Backward of proj_fwd. dx (assigned; nullptr: not needed) = dy W (+ the LoRA branch's input gradient);
// accumulates the gradients of W and b (unless frozen: grad undefined) and of A and B.
// accumulate_dx: dx += that instead (a block summing the input gradients of projections that read the same x:
// q/k/v, gate/up). CUDA: the dX GEMMs accumulate in place (beta = 1, LinearOut), no temporary and no add kernel.
// CPU: bit-identical to proj_bwd into a temporary followed by ops::add_ (the reference's order: with a LoRA pair
// the branch is added to the base's gradient in the temporary first).
void proj_bwd(const ExecContext& ex, const Param& w, Param* b, const Tensor& x, const Tensor& dy, Tensor* dx,
              bool accumulate_dx = false);

// The LoRA branch alone: y += branch(x). And its backward: grads of A, B accumulated; dx += input gradient
// (when dx is non-null).
void lora_fwd_add(const ExecContext& ex, const LoraAdapter& l, const Tensor& x, Tensor& y);
void lora_bwd_add(const ExecContext& ex, const LoraAdapter& l, const Tensor& x, const Tensor& dy, Tensor* dx);

// The grouped (MoE expert) branch on rows grouped by expert: x [R, in], offsets [E+1] (as the expert GEMMs
// use), y [R, out] += s * (x A_e^T) B_e^T; backward as lora_bwd_add (no dropout: PEFT allows none here).
void grouped_lora_fwd_add(const ExecContext& ex, const LoraAdapter& l, const Tensor& x, const Tensor& offsets,
                          const std::vector<int64_t>* counts, Tensor& y);
void grouped_lora_bwd_add(const ExecContext& ex, const LoraAdapter& l, const Tensor& x, const Tensor& offsets,
                          const std::vector<int64_t>* counts, const Tensor& dy, Tensor* dx);

}  // namespace am
