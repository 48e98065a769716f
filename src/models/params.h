// Trainable parameters: fp32 master values and fp32 gradients on the host, keyed by their HF names.
// The source dtype of each tensor is kept so the export writes back exactly what was read.
#pragma once
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace am {

struct LoraAdapter;  // models/blocks/lora.h
struct Nf4Weight;    // io/nf4.h

// Where (part of) a parameter lives in an HF checkpoint: the tensor `name` holds the contiguous block of
// `shape` starting `offset` elements into the parameter. A dense weight is one slice (itself); a fused MoE
// weight [E, 2I, H] is 2E slices in the hub's per-expert layout (experts.{e}.gate_proj / up_proj) or one in
// transformers 5's fused layout.
// transposed: the checkpoint tensor `shape` [..., A, B] is stored in the parameter as its transpose over the
// last two dims ([..., B, A], same numel, starting at `offset`). gpt_oss keeps its experts as [E, H, 2I] /
// [E, I, H] (x @ W) on the hub while the engine's grouped GEMMs take [E, out, in]; a pure permutation, so
// load + save round-trips bit for bit. (A contiguous slice cannot express it, hence the flag.)
struct SourceSlice {
  std::string name;
  int64_t offset = 0;
  Shape shape;
  bool transposed = false;
};
// Copies checkpoint tensor `src` (shape s.shape, any float dtype) into the parameter's fp32 storage `dst`
// (the whole parameter), honouring s.offset and s.transposed.
void copy_slice_in(const SourceSlice& s, const Tensor& src, float* dst);
// The inverse: the slice of fp32 parameter storage `src` as a new fp32 host tensor of shape s.shape.
Tensor copy_slice_out(const SourceSlice& s, const float* src);
using SourceLayout = std::vector<SourceSlice>;

struct Param {
  std::string name;      // HF name, e.g. "model.layers.0.self_attn.q_proj.weight"
  Shape shape;           // what this rank holds: the HF shape, or [E/ep, ...] for expert-parallel experts
  // Expert parallelism (dist/): this rank's part of the whole parameter is the flat element range
  // [global_offset, global_offset + numel) of the whole [E, ...] tensor of global_numel elements.
  int64_t global_offset = 0, global_numel = 0;
  bool expert = false;   // sharded over the expert-parallel group; its gradient reduces over expert replicas
  Tensor value;          // fp32 master weights (host on CPU, device on CUDA)
  Tensor grad;           // fp32, same shape; accumulated (+=) by backward
  Tensor work;           // what forward/backward compute with: `value` itself on CPU, a bf16 device copy
                         // on CUDA (refreshed by the optimizer step)
  // Under data parallelism (dist/data_parallel.h) value / grad / work are views into per-layer flat
  // buffers; under fsdp2 they exist only while the layer runs (gathered, then released).
  DType source_dtype = DType::F32;
  // false: a frozen weight (the base under LoRA): no gradient (grad undefined), no optimizer state, and on
  // CUDA only the working copy in the compute dtype (plus the fp32 value for 1-D weights: norms, biases).
  bool trainable = true;
  // The LoRA pair adapting this (frozen) Linear weight, when peft targets its module; owned by the model.
  const LoraAdapter* lora = nullptr;
  // QLoRA: a frozen Linear weight held in bitsandbytes' 4-bit form (io/nf4.h) instead of `work` / `value`;
  // the blocks dequantise it into a scratch buffer around each use (models/blocks/lora.h proj_fwd/proj_bwd).
  // quantize_4bit marks a weight to be quantised when it reaches its device (ParamStore::to_device).
  std::shared_ptr<const Nf4Weight> nf4;
  bool quantize_4bit = false;
  // Candidate checkpoint layouts, in order of preference (the first one is written for a model initialised
  // from a config); `layout` is the one the weights were loaded from, and the export writes it back.
  std::vector<SourceLayout> layouts;
  size_t layout = 0;
  const SourceLayout& source() const { return layouts.at(layout); }
};

// An optional parameter (a bias) as an op argument: its working copy for forward, its gradient for backward,
// or nullptr when the model has none.
inline const Tensor* work_or_null(const Param* p) { return p ? &p->work : nullptr; }
// A LoRA pair's weight (PEFT's "base_model.model.<module>.lora_A.weight"): not an HF checkpoint tensor.
inline bool is_adapter_param(const Param& p) { return p.name.rfind("base_model.model.", 0) == 0; }
inline Tensor* grad_or_null(Param* p) { return p && p->grad.defined() ? &p->grad : nullptr; }

class ParamStore {
 public:
  Param& add(const std::string& name, const Shape& shape, DType source_dtype = DType::F32);
  // Shapes only: add() records names, shapes and layouts but allocates no value / grad (pre-checks).
  void set_shapes_only(bool on) { shapes_only_ = on; }
  // false: add() allocates no gradient (the run keeps gradients elsewhere: on the device, or in dist/ buckets).
  void set_host_grads(bool on) { host_grads_ = on; }
  // An expert-parallel parameter: this rank holds rows [row_begin, row_begin + shape[0]) of a whole
  // parameter with global_rows rows.
  Param& add_expert(const std::string& name, const Shape& shape, int64_t row_begin, int64_t global_rows);
  Param& get(const std::string& name);
  const Param& get(const std::string& name) const;
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  std::deque<Param>& all() { return params_; }
  const std::deque<Param>& all() const { return params_; }
  void zero_grad();
  // Freezes p: trainable = false and its gradient released (the ops skip a weight gradient passed undefined).
  static void freeze(Param& p);
  // Moves master weights and grads to the context's device and makes the working copies.
  void to_device(const struct ExecContext& ex);
  // Data parallelism: to_device leaves trainable parameters' values on the host (and drops their host gradient),
  // because dist::DataParallel uploads only what the rank keeps (its shard under fsdp2) straight from them. The
  // whole model's fp32 value + gradient + working copy (10 bytes per parameter) then never exists on one GPU.
  void set_defer_trainable_to_device(bool on) { defer_trainable_ = on; }
  // QLoRA (bnb_4bit_*): how weights marked quantize_4bit are quantised.
  struct Quant4Options {
    int64_t blocksize = 64;
    bool double_quant = true;
    bool fp4 = false;
  } quant4;
  // Quantises the marked weights where they are now (the CPU path, which never calls to_device).
  void quantize_marked();
  // Storage groups (docs/fused_projections.md): parameters laid out back to back, in the order
  // given, in one allocation of each of value, grad and work, so that the blocks can run ONE GEMM over a
  // [sum of rows, in] view of Linear weights sharing their input (attention's q | k | v, the MLP's gate | up)
  // and get every part's dW from one weight-gradient GEMM. The parameters stay separate Params (HF names,
  // shapes, checkpoint layout, optimizer state). Kept by add() (CPU), to_device and pack_groups; anything that
  // re-lays parameters out elsewhere (data-parallel buckets keep registration order, 4-bit weights, pure bf16)
  // may or may not keep it, so the blocks check adjacency on every use (blocks/fused_proj.h) and fall back.
  void colocate(const std::vector<Param*>& group);
  // Re-lays each group's defined value / grad / work out back to back where they are not already (after code
  // that allocates parameters one by one, e.g. DecoderLM::to_device_inference). Same device and dtype kept.
  void pack_groups();
  int64_t numel() const;         // elements held by this rank
  int64_t global_numel() const;  // elements of the whole model

 private:
  std::deque<Param> params_;  // registration (= HF state_dict) order; deque: pointers stay valid
  std::map<std::string, size_t> index_;
  std::vector<std::vector<Param*>> groups_;  // colocate()
  bool shapes_only_ = false;
  bool defer_trainable_ = false;
  bool host_grads_ = true;
};

}  // namespace am
