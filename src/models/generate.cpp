#include "models/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <string>

#include "core/error.h"
#include "data/dataset.h"
#include "models/kv_cache.h"

namespace am {

int32_t argmax_token(const float* logits, int64_t V) {
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (logits[i] > logits[best] || std::isnan(logits[best])) best = i;  // strict >: the first maximum wins
  return static_cast<int32_t>(best);
}

std::vector<double> TokenSampler::tempered_probs(const float* logits, int64_t V, double temperature) {
  std::vector<double> p(static_cast<size_t>(V));
  double m = -INFINITY;
  for (int64_t i = 0; i < V; ++i) m = std::max(m, static_cast<double>(logits[i]) / temperature);
  double sum = 0.0;
  for (int64_t i = 0; i < V; ++i) sum += p[static_cast<size_t>(i)] = std::exp(static_cast<double>(logits[i]) / temperature - m);
  for (double& x : p) x /= sum;
  return p;
}

std::vector<int32_t> top_p_keep(const std::vector<double>& probs, double top_p) {
  const size_t V = probs.size();
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  // Ascending probability as HF sorts; among equal probabilities the higher id comes first, so the lower id
  // counts as the more likely one and is kept first.
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return probs[static_cast<size_t>(a)] < probs[static_cast<size_t>(b)] ||
           (probs[static_cast<size_t>(a)] == probs[static_cast<size_t>(b)] && a > b);
  });
  std::vector<int32_t> kept;
  double cum = 0.0;
  for (size_t r = 0; r < V; ++r) {
    cum += probs[static_cast<size_t>(order[r])];
    // cumulative <= 1 - top_p: removed, except the most likely token (min_tokens_to_keep = 1)
    if (cum > 1.0 - top_p || r + 1 == V) kept.push_back(order[r]);
  }
  std::reverse(kept.begin(), kept.end());
  return kept;
}

double TokenSampler::uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

int32_t TokenSampler::next(const float* logits, int64_t V) {
  if (opt_.temperature <= 0.f) return argmax_token(logits, V);
  const std::vector<double> p = tempered_probs(logits, V, opt_.temperature);
  std::vector<int32_t> kept;
  if (opt_.top_p < 1.f) {
    kept = top_p_keep(p, opt_.top_p);
    std::sort(kept.begin(), kept.end());  // draw over ids in index order, as torch.multinomial walks them
  } else {
    kept.resize(p.size());
    std::iota(kept.begin(), kept.end(), 0);
  }
  double mass = 0.0;
  for (int32_t t : kept) mass += p[static_cast<size_t>(t)];
  const double u = uniform() * mass;  // renormalised over the kept set (HF: -inf logits, then softmax)
  double cum = 0.0;
  for (int32_t t : kept) {
    cum += p[static_cast<size_t>(t)];
    if (u < cum) return t;
  }
  // Rounding left u at the very top: the last kept token with nonzero probability.
  for (auto it = kept.rbegin(); it != kept.rend(); ++it)
    if (p[static_cast<size_t>(*it)] > 0.0) return *it;
  return kept.back();
}

namespace {

// Logits [1, V] on the model's device -> fp32 on the host.
Tensor host_logits(const Tensor& logits) {
  Tensor h = ExecContext::download(logits);
  return h.dtype() == DType::F32 ? h : h.to(DType::F32);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

bool has_incremental_decode(const CausalLM& model) {
  if (dynamic_cast<const DecoderLM*>(&model)) return true;
  return dynamic_cast<const NemotronHLM*>(&model) && !model.exec().on_cuda();
}

GenerateResult generate(CausalLM& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                        const std::function<void(int32_t)>& on_token) {
  const int64_t V = model.config().vocab_size;
  if (prompt.empty()) throw DataError("generate: the prompt has no tokens");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= V)
      throw DataError("generate: prompt token " + std::to_string(i) + " has id " + std::to_string(prompt[i]) +
                      ", outside the model's vocabulary [0, " + std::to_string(V) + ")");
  if (opt.max_new_tokens < 1) throw DataError("generate: max_new_tokens must be >= 1");
  GenerateResult r;
  r.prompt_tokens = static_cast<int64_t>(prompt.size());
  // Room for the prompt and up to 1024 new tokens at first; doubled when full, up to every position the run
  // can reach (prompt + max_new_tokens - 1: the last token is picked, never fed back).
  const int64_t need = r.prompt_tokens + opt.max_new_tokens - 1;
  const int64_t first_capacity = std::min(need, r.prompt_tokens + 1024);
  const bool cached = opt.use_cache && has_incremental_decode(model);
  DecoderLM* lm = cached ? dynamic_cast<DecoderLM*>(&model) : nullptr;
  NemotronHLM* nh = cached ? dynamic_cast<NemotronHLM*>(&model) : nullptr;
  KvCache cache;
  NemotronHCache nh_cache;
  if (lm) cache = KvCache(model.config(), model.exec(), first_capacity);
  if (nh) nh_cache = nh->make_cache(first_capacity);
  r.cached = cached;
  // The next tokens through the cached path: logits [1, V] of the last one, on the host.
  auto step = [&](const std::vector<int32_t>& ids) {
    KvCache& kv = lm ? cache : nh_cache.kv;
    if (kv.length() + static_cast<int64_t>(ids.size()) > kv.capacity())
      kv.reserve(std::min(need, std::max(2 * kv.capacity(), kv.length() + static_cast<int64_t>(ids.size()))));
    return host_logits(lm ? lm->forward_incremental(ids, cache) : nh->forward_incremental(ids, nh_cache));
  };
  // Without a cache: the whole sequence so far through forward_logits, its last row.
  std::vector<int32_t> seq = prompt;
  auto recompute = [&]() {
    Sample s;
    s.input_ids = seq;
    s.labels.assign(seq.size(), -100);
    const Batch b = upload_batch(collate({&s}), model.exec());
    const Tensor all = model.forward_logits(b);  // [n, V]
    return host_logits(all.slice_rows(all.dim(0) - 1, all.dim(0)));
  };
  TokenSampler sampler(opt.sampling);
  auto is_eos = [&](int32_t t) {
    return std::find(opt.eos_token_ids.begin(), opt.eos_token_ids.end(), static_cast<int64_t>(t)) != opt.eos_token_ids.end();
  };

  auto t0 = std::chrono::steady_clock::now();
  Tensor logits = cached ? step(prompt) : recompute();  // [1, V]; the download syncs
  for (;;) {
    const int32_t tok = sampler.next(logits.f32(), V);
    r.tokens.push_back(tok);
    if (r.tokens.size() == 1) {
      r.prefill_s = seconds_since(t0);
      t0 = std::chrono::steady_clock::now();
    }
    if (on_token) on_token(tok);
    if (is_eos(tok)) {
      r.stopped_at_eos = true;
      break;
    }
    if (static_cast<int64_t>(r.tokens.size()) >= opt.max_new_tokens) break;
    if (!cached) {
      seq.push_back(tok);
      logits = recompute();
      continue;
    }
    logits = step({tok});
  }
  if (r.tokens.size() > 1) r.decode_s = seconds_since(t0);
  return r;
}

}  // namespace am
