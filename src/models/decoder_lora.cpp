// DecoderLM's LoRA: which of its modules a LoraSpec names, and the frozen-base + adapter setup
// (models/lora.h, models/blocks/lora.h).
#include <cmath>
#include <random>

#include "core/error.h"
#include "core/hash.h"
#include "models/decoder.h"
#include "models/lora.h"

namespace am {

std::vector<const LoraAdapter*> DecoderLM::enable_lora(const LoraSpec& spec, uint64_t seed,
                                                       std::vector<std::string>* warnings) {
  if (!lora_.empty()) throw UsageError("peft: LoRA is already enabled on this model");
  using K = LoraCandidate::Kind;
  // Every module a pattern may name, in HF's (transformers 5) module paths and state-dict order.
  std::vector<LoraCandidate> cands;
  auto lin = [&](const std::string& module, Param* w) { cands.push_back({module, K::Linear, w}); };
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& L = layers_[i];
    const std::string pre = "model.layers." + std::to_string(i) + ".";
    if (L.is_mla) {  // deepseek: the MLA projections (q_proj or q_a_proj + q_b_proj)
      if (L.mla.q) lin(pre + "self_attn.q_proj", L.mla.q);
      if (L.mla.q_a) lin(pre + "self_attn.q_a_proj", L.mla.q_a);
      if (L.mla.q_b) lin(pre + "self_attn.q_b_proj", L.mla.q_b);
      lin(pre + "self_attn.kv_a_proj_with_mqa", L.mla.kv_a);
      lin(pre + "self_attn.kv_b_proj", L.mla.kv_b);
      lin(pre + "self_attn.o_proj", L.mla.o);
    } else if (L.attn.qkv) {  // phi3: PEFT adapts the fused module as one Linear
      lin(pre + "self_attn.o_proj", L.attn.o);
      lin(pre + "self_attn.qkv_proj", L.attn.qkv);
    } else {
      lin(pre + "self_attn.q_proj", L.attn.q);
      lin(pre + "self_attn.k_proj", L.attn.k);
      lin(pre + "self_attn.v_proj", L.attn.v);
      lin(pre + "self_attn.o_proj", L.attn.o);
    }
    const MlpWeights* mlp = nullptr;
    std::string mpre = pre + "mlp.";
    if (L.is_moe) {
      cands.push_back({pre + (L.moe.gpt_oss_glu ? "mlp.router" : "mlp.gate"), K::Router, L.moe.router});
      LoraCandidate ex{pre + "mlp.experts", K::Experts, L.moe.gate_up, L.moe.down, {}};
      const bool mixtral = cfg_.model_type == "mixtral";
      ex.v4_names[0] = mixtral ? "w1" : "gate_proj";
      ex.v4_names[1] = mixtral ? "w3" : "up_proj";
      ex.v4_names[2] = mixtral ? "w2" : "down_proj";
      // gpt_oss never had per-expert Linear modules: only a pattern naming the experts module selects them
      // (and is refused below), so the default "*_proj" adapts the attention projections alone.
      if (L.moe.gpt_oss_glu) ex.v4_names[0] = ex.v4_names[1] = ex.v4_names[2] = "";
      cands.push_back(ex);
      if (L.moe.has_shared) {
        mlp = &L.moe.shared;
        mpre = pre + (cfg_.deepseek ? "mlp.shared_experts." : "mlp.shared_expert.");
      }
      if (L.moe.shared_gate) cands.push_back({pre + "mlp.shared_expert_gate", K::Router, L.moe.shared_gate});
    } else {
      mlp = &L.mlp;
    }
    if (mlp && mlp->gate_up) {
      lin(mpre + "gate_up_proj", mlp->gate_up);
      lin(mpre + "down_proj", mlp->down);
    } else if (mlp) {
      lin(mpre + "gate_proj", mlp->gate);
      lin(mpre + "up_proj", mlp->up);
      lin(mpre + "down_proj", mlp->down);
    }
  }
  cands.push_back({"lm_head", K::LmHead, &lm_head()});
  const std::vector<LoraChoice> chosen = select_lora_modules(spec, cands, warnings);
  if (cfg_.gpt_oss_glu)
    for (const LoraChoice& ch : chosen)
      if (ch.cand->kind == K::Experts || ch.cand->kind == K::Router)
        throw UsageError("peft: LoRA on gpt_oss's " + std::string(ch.cand->kind == K::Experts ? "experts" : "router") + " (" +
                         ch.cand->module + ") is not supported yet (biased router; interleaved, transposed expert "
                         "tensors); target the attention projections (q_proj, k_proj, v_proj, o_proj) instead");
  if (cfg_.gpt_oss_glu && warnings)
    warnings->push_back("peft: gpt_oss's experts and routers are not adapted (LoRA on them is not supported yet); "
                        "only the selected attention projections are");

  for (Param& p : ps_.all()) ParamStore::freeze(p);
  // One pair: A [r, in] / B [out, r], or (grouped, experts) A [E, r, in] / B [E, out, r]. `nest` is PEFT's
  // ".base_layer" for the inner of two ParamWrappers on one module.
  auto add_pair = [&](const std::string& module, const std::string& param, Param& w, bool grouped, int64_t r,
                      double alpha, const std::string& nest) {
    const size_t d = grouped ? 1 : 0;
    const int64_t out = w.shape.at(d), in = w.shape.at(d + 1), E = grouped ? w.shape.at(0) : 1;
    LoraAdapter a;
    a.module = module;
    a.param = param;
    a.grouped = grouped;
    a.rank = r;
    a.alpha = alpha;
    const std::string base = "base_model.model." + module + nest;
    if (grouped) {
      if (mp_.ep_size > 1)
        throw UsageError("peft: LoRA on MoE experts with distributed.ep_size > 1 is not implemented yet; use ep_size 1 "
                         "or leave the experts out of target_modules");
      a.A = &ps_.add(base + ".lora_A.weight", {E, r, in});
      a.B = &ps_.add(base + ".lora_B.weight", {E, out, r});
    } else {
      a.A = &ps_.add(base + ".lora_A.weight", {r, in});
      a.B = &ps_.add(base + ".lora_B.weight", {out, r});  // zero: the adapted model starts as the base
    }
    a.scale = static_cast<float>(spec.use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r));
    a.dropout = grouped ? 0.f : static_cast<float>(spec.dropout);
    a.dropout_post = spec.dropout_post;
    a.key = fnv1a(module + "." + param);
    a.pass = &lora_pass_;
    // A's init, per pair from (seed, name): AutoModel's xavier_normal_ (std sqrt(2 / (in + r))) or PEFT's
    // kaiming_uniform_(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)).
    std::mt19937_64 rng(seed ^ a.key);
    float* v = a.A->value.f32();
    const int64_t n = a.A->value.numel();
    if (spec.lora_A_init == "kaiming") {
      const float bound = 1.f / std::sqrt(static_cast<float>(in));
      std::uniform_real_distribution<float> u(-bound, bound);
      for (int64_t i = 0; i < n; ++i) v[i] = u(rng);
    } else {
      std::normal_distribution<float> nd(0.f, std::sqrt(2.f / static_cast<float>(in + r)));
      for (int64_t i = 0; i < n; ++i) v[i] = nd(rng);
    }
    lora_.push_back(std::move(a));
    w.lora = &lora_.back();
  };
  if (spec.dropout > 0)
    for (const LoraChoice& ch : chosen)
      if (ch.cand->kind == LoraCandidate::Kind::Experts && warnings) {
        warnings->push_back("peft.dropout: not applied to the MoE experts' LoRA (HF PEFT's ParamWrapper allows none)");
        break;
      }
  for (const LoraChoice& ch : chosen) {
    const LoraCandidate& c = *ch.cand;
    if (c.kind != LoraCandidate::Kind::Experts) {
      add_pair(c.module, "", *c.weight, false, spec.dim, spec.alpha, "");
      continue;
    }
    // PEFT nests two ParamWrappers on the experts module: down_proj outside, gate_up_proj inside (".base_layer").
    if (ch.down) add_pair(c.module, "down_proj", *c.down, true, spec.dim, spec.alpha, "");
    if (ch.gate_up)
      add_pair(c.module, "gate_up_proj", *c.weight, true, ch.gate_up_rank, ch.gate_up_alpha, ch.down ? ".base_layer" : "");
  }
  return lora_adapters();
}

std::vector<const LoraAdapter*> DecoderLM::lora_adapters() const {
  std::vector<const LoraAdapter*> out;
  for (const LoraAdapter& a : lora_) out.push_back(&a);
  return out;
}

}  // namespace am
