// Token-level text generation with a KV cache (automodel generate; the CLI in src/cli/cmd_generate.cpp does
// the tokenizer, chat template and model loading around it):
//   prefill: the prompt's n tokens run once through the model (DecoderLM::forward_incremental, or
//            NemotronHLM::forward_incremental: KV cache + Mamba2 conv / SSM states), filling the cache; its last
//            logits pick the first new token
//   decode:  each new token runs alone at the next position, attending over the cache (and continuing the Mamba2
//            states), until max_new_tokens or an EOS id
// Picking a token from logits [V] follows HF generate's logits processors:
//   temperature == 0:  greedy, argmax (the first maximal index, as torch.argmax) = generate(do_sample=False)
//   temperature > 0:   logits / temperature (TemperatureLogitsWarper), then nucleus filtering with top_p < 1
//                      (TopPLogitsWarper), then a draw from the softmax of what is left with a seeded
//                      mt19937_64 (same seed -> same tokens; not torch's RNG, so not HF's sampled tokens)
// HF's sampling default top_k = 50 is not applied (the command has no --top-k): like HF with top_k=0.
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "models/decoder.h"
#include "models/nemotron_h.h"

namespace am {

struct SamplingOptions {
  float temperature = 0.f;  // 0: greedy
  float top_p = 1.f;        // (0, 1]; 1: no nucleus filtering
  uint64_t seed = 0;
};

// The first index of the largest value (NaN never wins). logits [V].
int32_t argmax_token(const float* logits, int64_t V);

// HF TopPLogitsWarper's kept set for probabilities `probs` [V] (softmax of the tempered logits): sort
// ascending, drop every token whose ascending cumulative probability is <= 1 - top_p, always keep the most
// likely one. Equivalently: the most likely tokens, in order, until their mass reaches top_p (the smallest
// such set). Returns the kept token ids, most likely first (ties: lower id first).
std::vector<int32_t> top_p_keep(const std::vector<double>& probs, double top_p);

// Picks the next token from logits [V] (host fp32) as the class comment says.
class TokenSampler {
 public:
  explicit TokenSampler(const SamplingOptions& o) : opt_(o), rng_(o.seed) {}
  int32_t next(const float* logits, int64_t V);
  // softmax(logits / temperature) in double ([V]); exposed for tests.
  static std::vector<double> tempered_probs(const float* logits, int64_t V, double temperature);

 private:
  double uniform();  // [0, 1) from 53 bits of the generator: the same on every platform
  SamplingOptions opt_;
  std::mt19937_64 rng_;
};

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  SamplingOptions sampling;
  std::vector<int64_t> eos_token_ids;  // generation stops after producing one of these (it is kept in tokens)
  // false: no cache, every new token runs a full forward over the sequence so far (HF's use_cache=False; O(n^2)
  // time). For comparisons and timings; what a model without a cache path always does.
  bool use_cache = true;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // the new tokens (an EOS that stopped generation included, as HF returns it)
  bool stopped_at_eos = false;
  int64_t prompt_tokens = 0;
  double prefill_s = 0.0;  // prompt forward + picking the first token
  double decode_s = 0.0;   // the tokens after the first: one forward each
  bool cached = false;     // true: decoded from a cache; false: recomputed the whole sequence per token
};

// Whether generate() decodes `model` incrementally from a cache (true: a DecoderLM anywhere, nemotron_h on the
// CPU) or recomputes the sequence for every new token (nemotron_h on CUDA: no state-carrying Mamba2 scan kernel).
bool has_incremental_decode(const CausalLM& model);

// Greedy or sampled generation from `prompt` (token ids, non-empty, each < vocab_size). on_token, when
// set, is called with every new token as soon as it is picked (streaming). Throws DataError for an empty
// prompt or an id outside the model's vocabulary.
// A DecoderLM decodes with its KV cache, nemotron_h on the CPU with its hybrid cache (NemotronHCache); otherwise
// (nemotron_h on CUDA, or opt.use_cache false) every new token runs a full forward over the whole sequence: the same
// tokens, O(n^2) time.
GenerateResult generate(CausalLM& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                        const std::function<void(int32_t)>& on_token = nullptr);

}  // namespace am
