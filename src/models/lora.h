// Which modules LoRA adapts, and how (NeMo AutoModel's PeftConfig / ModuleMatcher; HF PEFT's LoraConfig).
// The model turns a LoraSpec into adapters (DecoderLM::enable_lora): every base weight is frozen and each
// selected Linear gets a trainable pair A [r, in], B [out, r] named as HF PEFT saves them,
// "base_model.model.<module>.lora_A.weight" / ".lora_B.weight".
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/params.h"

namespace am {

struct LoraSpec {
  std::vector<std::string> target_modules;   // patterns; empty with nothing else: ["*_proj"] (AutoModel)
  std::vector<std::string> exclude_modules;  // "every Linear except these" (exclusive with target_modules)
  bool match_all_linear = false;             // every Linear (AutoModel: including lm_head)
  int64_t dim = 8;                           // r
  double alpha = 32;                         // AutoModel's default (PEFT's is 8)
  double dropout = 0.0;
  bool dropout_post = true;                  // AutoModel's default "post"; "pre" is PEFT's
  std::string lora_A_init = "xavier";        // xavier (AutoModel) | kaiming (PEFT)
  bool use_rslora = false;
  double scale() const;                      // alpha / r, or alpha / sqrt(r) with rsLoRA
};

// One module a LoRA pattern can name.
struct LoraCandidate {
  enum class Kind { Linear, LmHead, Router, Experts };
  std::string module;      // HF module path: "model.layers.0.self_attn.q_proj", "lm_head", "model.layers.0.mlp.experts"
  Kind kind = Kind::Linear;
  Param* weight = nullptr; // the base Linear weight [out, in]; experts: gate_up_proj [E, 2I, H]
  // Experts only: down_proj [E, H, I], and the per-expert Linear names the hub / transformers 4 used for the
  // three projections (gate, up, down: "gate_proj", "up_proj", "down_proj"; Mixtral "w1", "w3", "w2").
  Param* down = nullptr;
  std::string v4_names[3];
};

// What LoRA goes on one selected candidate. Linear: one pair of rank r. Experts: PEFT's ParamWrapper pairs
// on the fused parameters, gate_up_proj (rank gate_up_rank) and/or down_proj (rank r).
struct LoraChoice {
  const LoraCandidate* cand = nullptr;
  bool gate_up = false, down = false;  // experts
  int64_t gate_up_rank = 0;            // experts: 2r when gate and up were named separately (PEFT), else r
  double gate_up_alpha = 0;
};

// AutoModel's wildcard rule (module_matcher.py): the pattern is anchored, `*` matches any run of characters;
// plus exact equality, plus HF PEFT's list rule for a bare name without dots or wildcards ("q_proj" matches
// every module whose last component is q_proj; under AutoModel's rule alone it would match only a top-level
// module, which no decoder has).
bool lora_pattern_matches(const std::string& pattern, const std::string& module);

// The candidates `spec` selects. Throws UsageError (exit 2) naming the peft key when the selection is empty,
// contradictory (target_modules with exclude_modules / match_all_linear), or names modules LoRA does not
// support here (routers, lm_head); `warnings` gets one line per module skipped by a broad rule
// (match_all_linear / exclude_modules: lm_head and routers are left un-adapted) and one when an MoE model's
// MLP projection names are read as the experts'.
//
// MoE models follow HF PEFT on transformers 5 (peft/utils/transformers_weight_conversion.py): the experts are
// fused 3-D parameters there, and PEFT rewrites target names gate_proj / up_proj / down_proj (Mixtral w1 /
// w3 / w2) into target_parameters gate_up_proj (rank 2r, alpha 2 alpha: the same scale) and down_proj (rank
// r). Those names then adapt the experts, and no Linear of that name (a dense MLP layer, a shared expert)
// is adapted; gate and up must be named together. A pattern naming the experts module itself
// ("*.experts", AutoModel's GroupedExperts) adapts both fused parameters at rank r.
std::vector<LoraChoice> select_lora_modules(const LoraSpec& spec, const std::vector<LoraCandidate>& cands,
                                            std::vector<std::string>* warnings);

// PEFT's tensor names for a module's pair.
std::string lora_a_name(const std::string& module);
std::string lora_b_name(const std::string& module);

}  // namespace am
