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
#pragma once
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

// A PEFT LoRA adapter folder, read and checked (config keys, tensor names, A/B shapes, ranks). Anything the
// merge cannot reproduce exactly is refused here, before any output is written: DoRA on embeddings, aLoRA,
// QALoRA, target_parameters (fused MoE parameters), trainable_token_indices, layer_replication, other PEFT
// types, adapter_model.bin only.
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
  std::vector<std::string> warnings;               // one line each (e.g. a module target_modules does not select)
  SafeTensors tensors;                             // the adapter's tensors (replacement values are read from here)

  // Throws IoError (missing files, bin-only adapter), FormatError (bad JSON, bad tensor names or shapes) or
  // UsageError (a PEFT feature the merge does not support: exit 2), naming the file and key or tensor.
  static LoraAdapter load(const std::string& dir);

  // True when the merge changes base tensor `name` (LoRA target, lora_bias bias or a replaced tensor).
  bool touches(const std::string& name) const;
  // Every base tensor the merge changes, sorted, with the adapter tensor that changes it (for messages).
  std::map<std::string, std::string> touched() const;
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
