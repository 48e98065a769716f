// HF PEFT LoRA adapters: reading an adapter folder (adapter_config.json + adapter_model.safetensors) and the
// merge rule of PEFT's `merge_and_unload()` for one base tensor.
//
// The merge, exactly as PEFT (huggingface/peft@5d602fdb, src/peft/tuners/lora/layer.py) computes it for a
// base loaded in dtype D with the adapter weights in fp32 (PEFT upcasts adapters to fp32 by default,
// `autocast_adapter_dtype=True`):
//   delta = fp32(fp32(B @ A) * fp32(scale))      Linear.get_delta_weight: `transpose(B @ A, fan_in_fan_out) * scaling`
//   Linear:    W' = D(fp32(W) + delta)           Linear.merge (safe_merge=False, merge_and_unload's default):
//                                                `base_layer.weight.data += delta_weight`, a D tensor += an fp32
//                                                one: torch adds in fp32 and rounds the sum once to D
//   Embedding: W' = D(fp32(W) + fp32(D(delta)))  Embedding.merge: `+= get_delta_weight(...).to(orig_dtype)`: the
//                                                delta is rounded to D first, then added and rounded again
//   DoRA:      W' = D(fp32(m / ||W + delta||_row) * fp32(W + delta))   DoraLinearVariant.merge_unsafe
//   lora_bias: b' = D(fp32(b) + fp32(B.bias * scale))
// where D(x) is torch's cast (round to nearest even for bf16/fp16) and scale = lora_alpha / r, or
// lora_alpha / sqrt(r) with use_rslora (Python double, then fp32 when torch multiplies an fp32 tensor by it).
// (For fp32 bases every D() is the identity and the rules collapse to W + delta.)
//
// Our B @ A: each element is sum_k B[o,k] * A[k,i] accumulated in double, k = 0, 1, ..., r-1, then rounded
// to fp32 (the products of two floats are exact in double). torch's fp32 GEMM accumulates in fp32 in an order
// its BLAS picks, so its fp32 delta can differ from ours in the last bit or two; after rounding to bf16 the
// merged weights agree except where the fp32 sum lands within a few fp32 ulps of a bf16 rounding boundary.
//
// Shapes (PyTorch's, row-major): Linear A [r, in], B [out, r], W [out, in] ([in, out] with fan_in_fan_out:
// GPT-2's Conv1D, delta transposed); Embedding lora_embedding_A [r, num_embeddings], lora_embedding_B
// [embedding_dim, r], W [num_embeddings, embedding_dim] (delta = (B @ A)^T); DoRA magnitude [out].
//
// LoRA on fused MoE expert parameters (`target_parameters`, PEFT's lora.ParamWrapper, layer.py): a 3-D
// parameter W [E, out, in] (transformers 5's `mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I],
// not transposed) has one pair for all experts: A [r·E, in] (row e·r + k) and B [out, r·E] (column k·E + e).
//   delta[e] = fp32(fp32(B_e @ A_e) * fp32(scale)),  A_e[k, i] = A[e·r + k, i],  B_e[o, k] = B[o, k·E + e]
//                                                  ParamWrapper.get_delta_weight: einsum("o r e, e r i -> e o i",
//                                                  B.reshape(out, r, E), A.reshape(E, r, in)) * scaling
//   W'[e] = D(fp32(W[e]) + fp32(D(delta[e])))     get_delta_weight casts the delta to the parameter's dtype
//                                                  (`delta_weight.to(param.device, param.dtype)`), then
//                                                  ParamWrapper.merge: `param.data += delta_weight` (the
//                                                  Embedding rule: the delta is rounded to D before the add)
// with r and lora_alpha after rank_pattern / alpha_pattern matched against the parameter's full name
// ("model.layers.0.mlp.experts.gate_up_proj", the `current_key` of LoraModel._create_and_replace), and
// scale = alpha / r (alpha / sqrt(r) with use_rslora); B_e @ A_e is summed as the Linear B @ A above.
// Two parameters of one module nest: PEFT wraps the module's parameters in registration order (gate_up_proj,
// then down_proj), each wrapper around the previous one, so the first is innermost: gate_up_proj's pair is
// saved as `<module>.base_layer.lora_A.weight`, down_proj's as `<module>.lora_A.weight` (also what
// transformers_weight_conversion.build_peft_weight_mapping assumes).
// The merge reaches the base in either checkpoint layout: the fused tensor `<module>.<param>` [E, out, in], or
// the hub's per-expert Linears `<prefix>.experts.{e}.gate_proj.weight` (rows [0, I) of gate_up_proj's
// delta[e]), `up_proj` (rows [I, 2I)), `down_proj` (delta of down_proj), and Mixtral's
// `model.layers.{l}.block_sparse_moe.experts.{e}.w1` (gate) / `w3` (up) / `w2` (down) for the adapter module
// `model.layers.{l}.mlp.experts` (transformers 5 renamed block_sparse_moe to mlp).
#pragma once
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/safetensors.h"

namespace am::io {

enum class LoraKind { Linear, Embedding };

// One LoRA pair as a PEFT layer holds it: everything the merge of one base weight needs. Usable without an
// adapter folder (a trainer holding A and B in memory fills one in).
struct LoraWeights {
  LoraKind kind = LoraKind::Linear;
  Tensor A;                     // [r, in] (Embedding: [r, num_embeddings]); F32/BF16/F16, host
  Tensor B;                     // [out, r] (Embedding: [embedding_dim, r])
  double scale = 1.0;           // lora_alpha / r or lora_alpha / sqrt(r), as Python computes it (double)
  bool fan_in_fan_out = false;  // Linear only: the base weight is stored [in, out]
  Tensor magnitude;             // DoRA `lora_magnitude_vector` [out]; undefined without DoRA
  Tensor bias;                  // `lora_B.bias` [out] (lora_bias=True); undefined otherwise
};

// The base weight shape these weights merge into ([out, in], [in, out] or [num_embeddings, embedding_dim]).
Shape lora_base_shape(const LoraWeights& w);
// Checks A/B (and magnitude/bias) against each other; throws ShapeError with `where` in the message.
void check_lora_weights(const LoraWeights& w, const std::string& where);

// The merged weight, as PEFT's merge would leave it on a base loaded in `out_dtype` (F32/BF16/F16; a base of
// another float dtype is first cast to out_dtype as from_pretrained(torch_dtype=...) would). `base` is the
// weight (host, any float dtype) of shape lora_base_shape(w). Throws ShapeError on a shape mismatch.
Tensor merge_lora_weight(const Tensor& base, const LoraWeights& w, DType out_dtype);
// Same, in place in `base`'s own dtype (what the streaming folder merge uses: no second copy of the tensor).
void merge_lora_weight_inplace(Tensor& base, const LoraWeights& w);
// The merged bias of a lora_bias=True layer: D(fp32(b) + fp32(w.bias * scale)), D = out_dtype.
Tensor merge_lora_bias(const Tensor& base_bias, const LoraWeights& w, DType out_dtype);

// One adapted module of an adapter folder.
struct LoraModule {
  std::string module;      // HF module path, e.g. "model.layers.0.self_attn.q_proj"
  std::string target;      // the base tensor it changes: module + ".weight"
  std::string bias_target; // module + ".bias" when the adapter has lora_B.bias, else ""
  int64_t r = 0;           // rank after rank_pattern
  double alpha = 0;        // lora_alpha after alpha_pattern
  std::string key_a, key_b, key_bias;  // adapter tensor names (as stored), for messages
  LoraWeights w;           // A, B, scale, ... (A/B as stored: any float dtype)
};

// One LoRA pair on a fused expert parameter (PEFT's ParamWrapper, `target_parameters`); layout and merge rule
// at the top of this file. Usable without an adapter folder (fill in module, param, r, num_experts, scale, A, B).
struct LoraExpertParam {
  std::string module;        // the experts module, transformers 5 path: "model.layers.0.mlp.experts"
  std::string param;         // the parameter: "gate_up_proj" | "down_proj" (any name merges in the fused layout)
  std::string target;        // module + "." + param: the fused base tensor, and the key in LoraAdapter::expert_params
  int depth = 0;             // nesting: 0 = "<module>.lora_A.weight" (outermost wrapper), 1 = "<module>.base_layer.lora_A.weight", ...
  std::string key_a, key_b;  // adapter tensor names (as stored), for messages
  int64_t r = 0;             // rank per expert, after rank_pattern
  int64_t num_experts = 0;   // E = A.dim(0) / r
  double alpha = 0;          // lora_alpha after alpha_pattern
  double scale = 1.0;        // alpha / r, or alpha / sqrt(r) with use_rslora (double, as Python computes it)
  Tensor A;                  // [r·E, in] as stored (row e·r + k); F32/BF16/F16, host
  Tensor B;                  // [out, r·E] as stored (column k·E + e)
};

// Where a base tensor lies in an expert parameter: the whole fused tensor, or one expert's block of rows.
struct LoraExpertSlice {
  const LoraExpertParam* param = nullptr;
  int64_t expert = -1;         // -1: the fused tensor [E, out, in] (or [out, in] when E == 1: a 2-D parameter)
  int64_t row0 = 0, rows = 0;  // rows [row0, row0 + rows) of delta[expert] (gate_proj [0, I), up_proj [I, 2I))
};

// The fused parameter's shape {E, out, in}.
Shape lora_expert_base_shape(const LoraExpertParam& p);
// Checks A/B against each other, r and num_experts; throws ShapeError with `where` in the message.
void check_lora_expert_param(const LoraExpertParam& p, const std::string& where);
// delta[e] = fp32(fp32(B_e @ A_e) * fp32(scale)) as an F32 tensor [out, in] (not yet rounded to any base dtype).
Tensor expert_delta(const LoraExpertParam& p, int64_t e);
// The merged value of (part of) the expert parameter, W' = D(fp32(W) + fp32(D(delta))), D = out_dtype (a base
// of another float dtype is first cast to out_dtype). expert -1: `base` is the fused [E, out, in] (row0 must be
// 0); else `base` is [rows, in], rows [row0, row0 + rows) of expert `expert`. Throws ShapeError on a mismatch.
Tensor merge_lora_expert(const Tensor& base, const LoraExpertParam& p, int64_t expert, int64_t row0, DType out_dtype);
// Same, in place in base's dtype.
void merge_lora_expert_inplace(Tensor& base, const LoraExpertParam& p, int64_t expert, int64_t row0);

// A PEFT LoRA adapter folder, read and checked (config keys, tensor names, A/B shapes, ranks). Anything the
// merge cannot reproduce exactly is refused here, before any output is written: DoRA on embeddings, aLoRA,
// QALoRA, trainable_token_indices, layer_replication, other PEFT types, adapter_model.bin only.
struct LoraAdapter {
  std::string dir;
  std::string config_path;   // DIR/adapter_config.json
  std::string weights_path;  // DIR/adapter_model.safetensors
  std::string base_model_name_or_path;  // from the config ("" when absent)
  bool use_rslora = false, use_dora = false;
  std::map<std::string, LoraModule> modules;       // by target tensor name ("<module>.weight")
  std::map<std::string, std::string> bias_owner;   // "<module>.bias" -> target, for lora_bias
  // Base tensors replaced whole by an adapter tensor (modules_to_save, trained biases with bias="all"/
  // "lora_only", saved embedding layers): base name -> adapter tensor name.
  std::map<std::string, std::string> replaced;
  // LoRA on fused MoE expert parameters (target_parameters), by the fused parameter name "<module>.<param>"
  // ("model.layers.0.mlp.experts.gate_up_proj").
  std::map<std::string, LoraExpertParam> expert_params;
  std::vector<std::string> warnings;               // one line each (e.g. a module target_modules does not select)
  SafeTensors tensors;                             // the adapter's tensors (replacement values are read from here)

  // Throws IoError (missing files, bin-only adapter), FormatError (bad JSON, bad tensor names or shapes) or
  // UsageError (a PEFT feature the merge does not support: exit 2), naming the file and key or tensor.
  static LoraAdapter load(const std::string& dir);

  // True when the merge changes base tensor `name` (LoRA target, lora_bias bias, a replaced tensor, or an expert
  // parameter in either layout: "<module>.gate_up_proj" or "<prefix>.experts.{e}.gate_proj.weight").
  bool touches(const std::string& name) const;
  // Every base tensor the merge changes, sorted, with the adapter tensor that changes it (for messages). Expert
  // parameters are listed by their fused name ("<module>.<param>"), whatever the base's layout.
  std::map<std::string, std::string> touched() const;
  // Same, with the expert parameters in the layout of a base that holds the tensors for which `base_has` is
  // true: the fused name where the base has it, else the per-expert names of the first naming that the base has
  // for expert 0 (experts.{e}.gate_proj/up_proj/down_proj, .w1/.w3/.w2, under mlp. or block_sparse_moe.), else
  // the fused name (which the base then lacks: reported by the caller).
  std::map<std::string, std::string> touched(const std::function<bool(const std::string&)>& base_has) const;
  // The expert parameter (and the part of it) that base tensor `name` holds, if any.
  std::optional<LoraExpertSlice> expert_slice(const std::string& name) const;
  // Checks the adapter's view of base tensor `name` against its stored dtype and shape; throws ShapeError /
  // FormatError naming the adapter tensor, the base tensor and both files. `dtype` is the safetensors name
  // ("BF16", "F8_E4M3", ...) so that a quantized base is reported, not misread.
  void check_base_tensor(const std::string& name, const std::string& dtype, const Shape& shape,
                         const std::string& base_file) const;
  // The merged value of base tensor `name` (which touches() must accept) given its stored value `base`,
  // rounded once to `out_dtype` (default: base's dtype), by the rules at the top of this file.
  Tensor merged(const std::string& name, const Tensor& base, std::optional<DType> out_dtype = std::nullopt) const;
  // Same, in place in base's dtype.
  void merge_inplace(const std::string& name, Tensor& base) const;
};

}  // namespace am::io
