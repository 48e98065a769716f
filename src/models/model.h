// The causal-LM interface the trainer drives, the micro-batch it consumes, and the registry that maps an
// HF `model_type` to a builder (one file per architecture registers itself in registry.cpp).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/tensor.h"
#include "io/model_config.h"
#include "models/exec.h"
#include "models/params.h"

namespace am {

namespace dist {
class Communicator;
}

// How the model is split across ranks (made by dist/, read by the blocks). Expert parallelism: this rank
// holds experts [ep_rank * E/ep_size, (ep_rank + 1) * E/ep_size) of every sparse layer and exchanges tokens
// with the other ranks of `ep` by all-to-all. `world` sums the per-step metrics over every rank.
struct ModelParallel {
  int ep_rank = 0, ep_size = 1;
  dist::Communicator* ep = nullptr;
  dist::Communicator* world = nullptr;
  // Register parameters (names, shapes, checkpoint layouts) without allocating them: for checking a
  // checkpoint's headers against the config before anything large exists (hf_weights.h).
  bool shapes_only = false;
  // false: trainable parameters get no host gradient buffer at registration (CUDA and data-parallel runs,
  // whose gradients live on the device or in dist/ buckets): 4 bytes per parameter less host memory at load.
  bool host_grads = true;
};

// Called by the model around each parameter unit's use, so that data parallelism can gather sharded
// weights ahead of use and reduce gradients as soon as a unit's backward is done (dist/data_parallel.h).
// Units: 0 = the root (embedding, final norm, lm_head: needed from the first forward op to the last
// backward op), i + 1 = decoder layer i. Order per micro-batch: before_use(0), then per layer before_use(i),
// after_forward(i); backward in reverse: before_use(i, true), after_backward(i); finally after_backward(0).
// A forward-only pass ends with after_forward(0).
class ParamHooks {
 public:
  virtual ~ParamHooks() = default;
  virtual void before_use(int unit, bool backward) = 0;
  virtual void after_forward(int unit) = 0;
  virtual void after_backward(int unit) = 0;
};

// One right-padded micro-batch, flattened to N = B*T tokens.
struct Batch {
  int64_t B = 0, T = 0;
  Tensor input_ids;    // [N] int32 (padding: any valid id, e.g. 0)
  Tensor positions;    // [N] int32 on the host (RoPE tables are built there), restarting at 0 per sample
  Tensor targets;      // [N] int32, already shifted: targets[t] = labels[t+1], -100 ignored
  Tensor segment_ids;  // [B, T] int32: sample index within the row (>= 0), -1 for padding
  // True when every row is one sample, right-padded or not (no packing): causal attention then needs no segment
  // mask, so it is given none (the kernels run without the segment table, and cuDNN's fused attention, which takes
  // no segment ids, can run). Exact: a real token's query never reaches a padding key, which comes after it, and
  // padding rows (targets -100) get zero gradient, so they add nothing to any real token's gradient
  // (Collate.OneSegmentRowsWithoutPackingNeedNoMask). Set by collate() on the host; false (use segment_ids) when
  // unknown. Everything else that reads segment_ids (Mamba2's state resets, the MoE aux loss's padding) still does.
  bool one_segment_rows = false;
  int64_t num_label_tokens = 0;  // count of targets != -100
  int64_t num_real_tokens = 0;   // count of non-padding tokens
};

// The segment ids causal attention needs for b (AttnParams::segment_ids): none when every row is one sample
// (Batch::one_segment_rows), else b's.
inline const Tensor* attention_segment_ids(const Batch& b) {
  return b.segment_ids.defined() && !b.one_segment_rows ? &b.segment_ids : nullptr;
}

struct ForwardOptions {
  bool activation_checkpointing = false;  // recompute block activations in backward instead of storing
  int64_t loss_chunk_rows = 1024;         // rows of the fused lm_head + CE per chunk (never full logits)
  // MoE with output_router_logits: this micro-batch's router aux loss enters the step's loss (and its
  // gradient) as router_aux_loss_coef * aux * aux_loss_scale. The trainer sets 1 / (micro-batches per step),
  // so the step's aux term is the mean over micro-batches (= HF's value for a single forward).
  float aux_loss_scale = 1.0f;
  bool fake_balanced_gate = false;        // model.backend.fake_balanced_gate (benchmarks)
  // false for a padding-only micro-batch (a data-parallel rank short of samples): its routing is not
  // counted in the utilisation metrics and it adds no aux loss.
  bool count_metrics = true;
  // LoRA dropout (forward_backward only): the masks are a pure function of this seed, which the trainer
  // derives from (seed, step, micro-batch, rank), so a resumed run drops exactly what the straight run did.
  uint64_t dropout_seed = 0;
};

struct LoraSpec;     // models/lora.h
struct LoraAdapter;  // models/blocks/lora.h

class CausalLM {
 public:
  virtual ~CausalLM() = default;
  virtual const io::ModelConfig& config() const = 0;
  virtual ParamStore& params() = 0;
  // The parameter units of ParamHooks, each in registration order; every parameter is in exactly one.
  virtual std::vector<std::vector<Param*>> param_units() = 0;
  virtual void set_param_hooks(ParamHooks* hooks) = 0;
  // Moves the parameters to ex's device (after weights are loaded on the host) and computes there from now.
  virtual void to_device(const ExecContext& ex) = 0;
  virtual const ExecContext& exec() const = 0;
  // Forward and backward of one micro-batch. Returns the SUM of token cross-entropy over the micro-batch
  // (double); accumulates into every parameter's grad the gradient of (sum CE) * grad_scale.
  virtual double forward_backward(const Batch& b, float grad_scale, const ForwardOptions& opt = {}) = 0;
  // Forward only: sum of token CE (validation).
  virtual double forward_loss(const Batch& b, const ForwardOptions& opt = {}) = 0;
  // Forward only: full logits [N, V] on the model's device in its activation dtype (tests, generation).
  virtual Tensor forward_logits(const Batch& b) = 0;
  // Matmul parameters per token (for FLOPs/MFU: PaLM convention; active parameters for MoE).
  virtual int64_t matmul_params_per_token() const = 0;
  // What forward_backward added to the loss besides the summed CE since the last call, already scaled as
  // ForwardOptions says (MoE router aux loss; 0 for dense models). Resets.
  virtual double take_aux_loss() { return 0.0; }
  // Extra per-step numbers for training.jsonl (MoE: expert utilisation, aux loss). Resets.
  virtual nlohmann::json take_step_metrics() { return nlohmann::json::object(); }
  // LoRA (models/lora.h): freezes every base parameter and adds a trainable A/B pair (host, fp32; A
  // initialised per spec.lora_A_init from `seed`, B zero) to each module the spec selects. Call after the
  // weights are loaded and before to_device. Throws UsageError for a selection it cannot honour; `warnings`
  // gets one line per module a broad rule leaves out.
  virtual std::vector<const LoraAdapter*> enable_lora(const LoraSpec& spec, uint64_t seed, std::vector<std::string>* warnings);
  // The adapters enable_lora made, in registration order (empty: full fine-tuning).
  virtual std::vector<const LoraAdapter*> lora_adapters() const { return {}; }
};

using ModelBuilder = std::function<std::unique_ptr<CausalLM>(const io::ModelConfig&, const ModelParallel&)>;
void register_model(const std::string& model_type, ModelBuilder b);
bool is_supported_model_type(const std::string& model_type);
std::vector<std::string> supported_model_types();
// Builds the model for cfg.model_type with zero-initialised parameters; throws FormatError for unknown types.
// With mp.ep_size > 1 only this rank's experts are allocated. Throws UsageError when ep_size does not divide
// the expert count.
std::unique_ptr<CausalLM> build_model(const io::ModelConfig& cfg, const ModelParallel& mp = {});

}  // namespace am
