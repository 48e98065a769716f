// automodel generate --model DIR [--adapter DIR] (--prompt TEXT | --chat TEXT) [--max-new-tokens N]
//                    [--temperature T] [--top-p P] [--seed S] [--device auto|cpu|cuda|cuda:N]
// Argument parsing and text in / text out; the model side is models/inference.h (loading) and
// models/generate.h (the KV-cache loop). Stdout carries only the generated text (docs/generate.md).
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"
#include "io/model_config.h"
#include "models/generate.h"
#include "models/inference.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace am {

namespace {

#define AM_GENERATE_SYNOPSIS                                                                   \
  "usage: automodel generate --model DIR [--adapter DIR] (--prompt TEXT | --chat TEXT)\n"     \
  "                          [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]\n" \
  "                          [--device auto|cpu|cuda|cuda:N]\n"
const char* kGenerateSynopsis = AM_GENERATE_SYNOPSIS "(automodel generate --help explains each flag)";
const char* kGenerateUsage =
    AM_GENERATE_SYNOPSIS
    "\n"
    "  --model DIR          HF model folder (config.json, safetensors, tokenizer), or a hub id in the local HF cache\n"
    "  --adapter DIR        HF PEFT LoRA adapter to merge into the model in memory\n"
    "  --prompt TEXT        raw prompt, tokenized with the model's special tokens (e.g. BOS)\n"
    "  --chat TEXT          one user message, rendered through the chat template with the generation prompt\n"
    "  --max-new-tokens N   stop after N new tokens (default: generation_config.json's max_new_tokens, else 128)\n"
    "  --temperature T      0 (default): greedy, as HF generate(do_sample=False); > 0: sample\n"
    "  --top-p P            nucleus sampling: keep the smallest set of tokens with probability >= P (default 1)\n"
    "  --seed S             sampling seed (default 0): the same seed gives the same text\n"
    "  --device D           auto (default: the GPU when one is visible), cpu, cuda or cuda:N\n"
    "\n"
    "Generation also stops at an EOS id of generation_config.json (else config.json). Stdout carries only the\n"
    "generated text (special tokens skipped); logs go to stderr.\n";

[[noreturn]] void usage_error(const std::string& msg) { throw UsageError("generate: " + msg + "\n" + kGenerateSynopsis); }

int64_t parse_int(const std::string& flag, const std::string& v, int64_t lo) {
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno == ERANGE || x < lo)
    usage_error(flag + ": expected an integer >= " + std::to_string(lo) + ", got '" + v + "'");
  return x;
}

double parse_float(const std::string& flag, const std::string& v) {
  errno = 0;
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(x))
    usage_error(flag + ": expected a number, got '" + v + "'");
  return x;
}

// Prints the generated text as it grows when stdout is a terminal. Decoding a prefix of the tokens is not
// always a prefix of the final text (a multi-byte character split over byte tokens, a decoder that strips
// or cleans up spaces), so only the part of decode(tokens so far) up to its last space or newline is shown,
// and only while it extends what is already on the screen; the rest comes at the end.
class TerminalStream {
 public:
  explicit TerminalStream(const tok::Tokenizer& tk) : tk_(tk) {}
  void on_token(int32_t t) {
    ids_.push_back(t);
    const std::string s = tk_.decode(ids_, true);
    const size_t cut = s.find_last_of(" \n");
    if (cut == std::string::npos || cut + 1 <= shown_.size()) return;
    const std::string safe = s.substr(0, cut + 1);
    if (safe.compare(0, shown_.size(), shown_) != 0) return;
    std::fwrite(safe.data() + shown_.size(), 1, safe.size() - shown_.size(), stdout);
    std::fflush(stdout);
    shown_ = safe;
  }
  void finish(const std::string& text) {
    if (text.compare(0, shown_.size(), shown_) == 0) {
      std::fwrite(text.data() + shown_.size(), 1, text.size() - shown_.size(), stdout);
    } else {
      std::fputs("\n", stdout);  // what was shown is not a prefix of the final text: show the final one whole
      std::fwrite(text.data(), 1, text.size(), stdout);
    }
    std::fputs("\n", stdout);
    std::fflush(stdout);
  }

 private:
  const tok::Tokenizer& tk_;
  std::vector<int32_t> ids_;
  std::string shown_;
};

std::string fmt(const char* f, double a, double b = 0, double c = 0) {
  char buf[256];
  std::snprintf(buf, sizeof buf, f, a, b, c);
  return buf;
}

}  // namespace

int cmd_generate(int argc, char** argv) {
  InferenceLoadOptions lo;
  std::string prompt, chat;
  bool have_prompt = false, have_chat = false, have_max = false;
  int64_t max_new = 128;
  SamplingOptions so;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto eq = a.find('=');
    const std::string name = a.rfind("--", 0) == 0 && eq != std::string::npos ? a.substr(0, eq) : a;
    auto value = [&]() -> std::string {
      if (eq != std::string::npos && a.rfind("--", 0) == 0) return a.substr(eq + 1);
      if (i + 1 >= argc) usage_error(name + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kGenerateUsage, stdout);
      return 0;
    } else if (name == "--model") {
      lo.model = value();
    } else if (name == "--adapter") {
      lo.adapter = value();
      if (lo.adapter.empty()) usage_error("--adapter needs a folder");
    } else if (name == "--prompt") {
      prompt = value();
      have_prompt = true;
    } else if (name == "--chat") {
      chat = value();
      have_chat = true;
    } else if (name == "--max-new-tokens") {
      max_new = parse_int(name, value(), 1);
      have_max = true;
    } else if (name == "--temperature") {
      so.temperature = static_cast<float>(parse_float(name, value()));
      if (so.temperature < 0.f) usage_error("--temperature: expected a number >= 0");
    } else if (name == "--top-p") {
      const double p = parse_float(name, value());
      if (!(p > 0.0 && p <= 1.0)) usage_error("--top-p: expected a number in (0, 1], got " + std::to_string(p));
      so.top_p = static_cast<float>(p);
    } else if (name == "--seed") {
      so.seed = static_cast<uint64_t>(parse_int(name, value(), 0));
    } else if (name == "--device") {
      lo.device = value();
    } else {
      usage_error("unknown argument '" + a + "'");
    }
  }
  if (lo.model.empty()) usage_error("--model DIR is required");
  if (have_prompt == have_chat) usage_error(have_prompt ? "give --prompt or --chat, not both" : "--prompt TEXT or --chat TEXT is required");
  if (lo.device != "auto" && lo.device != "cpu" && lo.device != "cuda" && lo.device.rfind("cuda:", 0) != 0)
    usage_error("--device: expected auto, cpu, cuda or cuda:N, got '" + lo.device + "'");

  // The tokenizer and the prompt first: a missing tokenizer or chat template fails before the weights load.
  std::string dir;
  try {
    dir = io::resolve_model_path(lo.model);
  } catch (const IoError& e) {
    throw IoError(std::string("--model: ") + e.what());
  }
  const tok::Tokenizer tk = tok::Tokenizer::from_dir(dir);

  std::vector<int32_t> ids;
  if (have_prompt) {
    ids = tk.encode(prompt, /*add_special_tokens=*/true);  // HF tokenizer(prompt)
  } else {
    // HF apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True, tokenize=True):
    // render, then tokenize without adding special tokens again (the template wrote them).
    const tok::ChatTemplate tmpl = tok::load_chat_template(dir);
    nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
    msgs.push_back({{"role", "user"}, {"content", chat}});
    ids = tk.encode(tok::render_chat_template(tmpl, msgs, /*add_generation_prompt=*/true), false);
  }
  if (ids.empty()) throw UsageError("generate: the prompt is empty after tokenization (nothing to continue from)");

  lo.model = dir;
  InferenceModel m = load_for_inference(lo);
  const io::ModelConfig& cfg = m.model->config();

  const GenerationDefaults gd = read_generation_defaults(m.dir, cfg);
  GenerateOptions go;
  go.max_new_tokens = have_max ? max_new : gd.max_new_tokens.value_or(128);
  go.sampling = so;
  go.eos_token_ids = gd.eos_token_ids;

  std::string eos_list;
  for (int64_t e : go.eos_token_ids) eos_list += (eos_list.empty() ? "" : ",") + std::to_string(e);
  log::info("generate: " + cfg.model_type + " from " + m.dir + " on " + m.device +
            (m.device == "cpu" ? " (fp32)" : " (" + m.device_name + ", bf16)"));
  log::info("generate: prompt " + std::to_string(ids.size()) + " tokens, max_new_tokens " + std::to_string(go.max_new_tokens) +
            ", " + (so.temperature > 0.f ? fmt("temperature %g, top_p %g, seed ", so.temperature, so.top_p) + std::to_string(so.seed)
                                         : std::string("greedy")) +
            ", eos [" + eos_list + "]" + (gd.eos_source.empty() ? "" : " from " + gd.eos_source));

  if (!has_incremental_decode(*m.model))
    log::info("generate: " + cfg.model_type + " has no state cache on " + m.device + " yet (Mamba2 conv/SSM states): "
              "each new token recomputes the whole sequence (same tokens, slower for long outputs)");
  const bool tty = isatty(fileno(stdout));
  TerminalStream stream(tk);
  std::function<void(int32_t)> cb;
  if (tty) cb = [&](int32_t t) { stream.on_token(t); };
  const GenerateResult r = generate(*m.model, ids, go, cb);
  const std::string text = tk.decode(r.tokens, /*skip_special_tokens=*/true);  // HF decode(new, skip_special_tokens=True)
  if (tty) {
    stream.finish(text);
  } else {
    // Exactly the decoded text, no newline added: `$(automodel generate ...)` and file comparisons see what
    // HF's decode returns.
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  }
  const double n_dec = static_cast<double>(r.tokens.size()) - 1.0;
  log::info("generate: " + std::to_string(r.tokens.size()) + " new tokens, stopped at " +
            (r.stopped_at_eos ? "eos" : "max_new_tokens"));
  log::info(fmt("generate: prefill %.0f tokens in %.3f s (%.1f tokens/s)", static_cast<double>(r.prompt_tokens), r.prefill_s,
                r.prefill_s > 0 ? r.prompt_tokens / r.prefill_s : 0.0) +
            (n_dec > 0 ? fmt("; decode %.0f tokens in %.3f s (%.1f tokens/s)", n_dec, r.decode_s,
                             r.decode_s > 0 ? n_dec / r.decode_s : 0.0) +
                             (r.cached ? " from the cache" : ", each recomputing the sequence")
                       : std::string("; decode: none")));
  return 0;
}

}  // namespace am
