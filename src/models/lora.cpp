#include "models/lora.h"

#include <cmath>
#include <regex>
#include <set>

#include "core/error.h"

namespace am {

double LoraSpec::scale() const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(dim)) : alpha / static_cast<double>(dim);
}

std::string lora_a_name(const std::string& module) { return "base_model.model." + module + ".lora_A.weight"; }
std::string lora_b_name(const std::string& module) { return "base_model.model." + module + ".lora_B.weight"; }

bool lora_pattern_matches(const std::string& pattern, const std::string& module) {
  if (pattern == module) return true;
  const bool wild = pattern.find('*') != std::string::npos;
  if (!wild) {
    // PEFT's list form: a bare module name matches as the last path component.
    if (pattern.find('.') == std::string::npos && module.size() > pattern.size() &&
        module.compare(module.size() - pattern.size(), pattern.size(), pattern) == 0 &&
        module[module.size() - pattern.size() - 1] == '.')
      return true;
    return false;
  }
  // AutoModel: "*" -> ".*" and the pattern anchored; other characters literal (AutoModel leaves "." a regex
  // wildcard, which only matters for names that differ from the pattern by a non-dot character there).
  std::string re = "^";
  for (char c : pattern) {
    if (c == '*') re += ".*";
    else if (std::string("\\^$.|?+()[]{}").find(c) != std::string::npos) re += std::string("\\") + c;
    else re += c;
  }
  re += "$";
  return std::regex_match(module, std::regex(re));
}

std::vector<LoraChoice> select_lora_modules(const LoraSpec& spec, const std::vector<LoraCandidate>& cands,
                                            std::vector<std::string>* warnings) {
  using K = LoraCandidate::Kind;
  if (!spec.target_modules.empty() && !spec.exclude_modules.empty())
    throw UsageError("peft.target_modules and peft.exclude_modules are mutually exclusive (as in AutoModel); give one");
  if (spec.match_all_linear && (!spec.target_modules.empty() || !spec.exclude_modules.empty()))
    throw UsageError("peft.match_all_linear: true needs target_modules and exclude_modules empty (as in AutoModel)");
  if (spec.dim < 1) throw UsageError("peft.dim must be >= 1, got " + std::to_string(spec.dim));
  std::vector<std::string> targets = spec.target_modules;
  const bool broad = spec.match_all_linear || !spec.exclude_modules.empty();
  if (targets.empty() && !broad) targets = {"*_proj"};  // AutoModel's default
  // Does the rule select `name` (a module path)? Returns the pattern that did ("" for a broad rule).
  auto selects = [&](const std::string& name, std::string* by) {
    if (broad) {
      for (const auto& p : spec.exclude_modules)
        if (lora_pattern_matches(p, name)) return false;
      return true;
    }
    for (const auto& p : targets)
      if (lora_pattern_matches(p, name)) {
        if (by) *by = p;
        return true;
      }
    return false;
  };
  // MoE: the per-expert projection names (gate, up, down) of this model, which PEFT maps onto the experts.
  std::set<std::string> expert_names;
  for (const LoraCandidate& c : cands)
    if (c.kind == K::Experts)
      for (const auto& n : c.v4_names) expert_names.insert(n);
  auto leaf = [](const std::string& m) { return m.substr(m.rfind('.') + 1); };

  std::vector<LoraChoice> out;
  std::vector<std::string> shadowed;  // Linear modules whose names went to the experts
  for (const LoraCandidate& c : cands) {
    std::string by;
    if (c.kind == K::Experts) {
      LoraChoice ch;
      ch.cand = &c;
      if (!broad && selects(c.module, &by)) {  // the experts module itself (AutoModel's GroupedExperts)
        ch.gate_up = ch.down = true;
        ch.gate_up_rank = spec.dim;
        ch.gate_up_alpha = spec.alpha;
      } else {
        // The transformers-4 names of the projections inside it, as PEFT probes them.
        const bool g = selects(c.module + "." + c.v4_names[0], nullptr), u = selects(c.module + "." + c.v4_names[1], nullptr);
        ch.down = selects(c.module + "." + c.v4_names[2], nullptr);
        if (g != u)
          throw UsageError("peft.target_modules: names " + c.v4_names[g ? 0 : 1] + " without " + c.v4_names[g ? 1 : 0] +
                           ", but the experts of " + c.module + " hold them fused in one gate_up_proj parameter "
                           "(as HF PEFT, name both or neither)");
        ch.gate_up = g && u;
        ch.gate_up_rank = 2 * spec.dim;
        ch.gate_up_alpha = 2 * spec.alpha;
      }
      if (ch.gate_up || ch.down) out.push_back(ch);
      continue;
    }
    if (!selects(c.module, &by)) continue;
    if (c.kind == K::Linear && expert_names.count(leaf(c.module))) {
      shadowed.push_back(c.module);
      continue;
    }
    if (c.kind != K::Linear) {
      const char* what = c.kind == K::LmHead ? "lm_head (its fused loss kernel has no LoRA path yet)" : "MoE routers";
      if (broad) {
        if (warnings) warnings->push_back("peft: " + c.module + " is not adapted: LoRA on " + what + " is not supported");
        continue;
      }
      throw UsageError("peft.target_modules: '" + by + "' selects " + c.module + ", but LoRA on " + what +
                       " is not supported; attention, MLP and expert projections are");
    }
    LoraChoice ch;
    ch.cand = &c;
    out.push_back(ch);
  }
  if (!shadowed.empty() && warnings)
    warnings->push_back("peft: on this MoE model the MLP projection names adapt the experts (as HF PEFT on transformers 5), "
                        "so " + std::to_string(shadowed.size()) + " Linear module(s) of those names are not adapted, e.g. " +
                        shadowed.front() + " (HF PEFT adapts none of them either)");
  if (out.empty()) {
    std::string eg;
    for (size_t i = 0; i < cands.size() && i < 3; ++i) eg += (i ? ", " : "") + cands[i].module;
    throw UsageError(std::string("peft.") + (broad ? "exclude_modules" : "target_modules") +
                     " selects no module of this model (its modules are named like " + eg + ")");
  }
  return out;
}

}  // namespace am
