// `automodel finetune | bench | eval` — recipe-driven commands.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"
#include "train/recipe.h"
#include "train/trainer.h"

namespace am {

namespace {
struct RecipeArgs {
  std::string recipe;
  std::vector<std::string> overrides;
  std::string out;            // bench --out
  int64_t nproc = 1;
};

// Parses `RECIPE.yaml [--a.b.c=VALUE | --a.b.c VALUE ...] [--nproc-per-node N] [--out F]`, and the older
// `llm -c RECIPE.yaml` form.
RecipeArgs parse_recipe_args(int argc, char** argv, const char* cmd) {
  RecipeArgs a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto value = [&](const std::string& flag) -> std::string {
      if (i + 1 >= argc) throw UsageError(std::string(cmd) + ": " + flag + " needs a value");
      return argv[++i];
    };
    if (s == "llm" && a.recipe.empty()) continue;  // `finetune llm -c RECIPE`
    if (s == "-c" || s == "--config") { a.recipe = value(s); continue; }
    if (s == "--nproc-per-node" || s == "--nproc_per_node") {
      try { a.nproc = std::stoll(value(s)); } catch (const std::invalid_argument&) { throw UsageError(s + ": expected an integer"); }
      continue;
    }
    if (s.rfind("--nproc-per-node=", 0) == 0) { a.nproc = std::stoll(s.substr(17)); continue; }
    if (s == "--out") { a.out = value(s); continue; }
    if (s.rfind("--out=", 0) == 0) { a.out = s.substr(6); continue; }
    if (s.rfind("--", 0) == 0 && s.size() > 2) {
      std::string kv = s.substr(2);
      if (kv.find('=') == std::string::npos) kv += "=" + value(s);
      a.overrides.push_back(kv);
      continue;
    }
    if (a.recipe.empty()) { a.recipe = s; continue; }
    throw UsageError(std::string(cmd) + ": unexpected argument '" + s + "'");
  }
  if (a.recipe.empty()) throw UsageError(std::string("usage: automodel ") + cmd + " RECIPE.yaml [--section.key=VALUE ...]");
  if (a.nproc != 1) throw UsageError("--nproc-per-node " + std::to_string(a.nproc) + ": multi-GPU training is not implemented yet (use 1)");
  return a;
}
}  // namespace

int cmd_finetune(int argc, char** argv) {
  auto a = parse_recipe_args(argc, argv, "finetune");
  Recipe r = Recipe::load(a.recipe, a.overrides);
  Trainer t(r);
  t.train();
  return 0;
}

int cmd_eval(int argc, char** argv) {
  auto a = parse_recipe_args(argc, argv, "eval");
  Recipe r = Recipe::load(a.recipe, a.overrides);
  if (!r.has("validation_dataset")) throw RecipeError(a.recipe + ": eval needs a validation_dataset section");
  Trainer t(r, TrainerOptions{.quiet = true});
  int64_t n = 0;
  double loss = t.validate(&n);
  nlohmann::json j = {{"val_loss", loss}, {"num_label_tokens", n}};
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

int cmd_bench(int argc, char** argv) {
  auto a = parse_recipe_args(argc, argv, "bench");
  Recipe r = Recipe::load(a.recipe, a.overrides);
  Trainer t(r, TrainerOptions{.quiet = true});
  const int64_t warm = r.get_int("step_scheduler.warmup_steps", 3), timed = r.get_int("step_scheduler.timed_steps", 10);
  if (warm < 0 || timed < 1) r.fail("step_scheduler.timed_steps", "need warmup_steps >= 0 and timed_steps >= 1");
  t.run_steps(warm);
  t.reset_peak_mem();
  auto stats = t.run_steps(timed);
  double step_s = 0, fb = 0, opt = 0, tokens = 0, seq = 0;
  for (auto& s : stats) {
    step_s += s.time_s;
    fb += s.fwd_bwd_s;
    opt += s.opt_s;
    tokens += s.num_tokens;
  }
  seq = tokens / (static_cast<double>(timed) * t.global_batch_size());
  const double tps = tokens / step_s;
  const double tflops = tps * t.flops_per_token(seq) / 1e12;
  const auto& c = t.model().config();
  nlohmann::json j = {
      {"tokens_per_s", tps}, {"tokens_per_s_per_gpu", tps}, {"tflops_per_gpu", tflops},
      {"mfu", t.peak_flops() > 0 ? nlohmann::json(tflops * 1e12 / t.peak_flops()) : nlohmann::json(nullptr)},
      {"peak_mem_gib", t.peak_mem_gib()}, {"gpu", t.gpu_name()},
      {"step_ms", 1e3 * step_s / timed}, {"fwd_ms", nullptr}, {"bwd_ms", nullptr},
      {"fwd_bwd_ms", 1e3 * fb / timed}, {"opt_ms", 1e3 * opt / timed}, {"world_size", 1},
      {"device", t.device_name()}, {"warmup_steps", warm}, {"timed_steps", timed},
      {"model", {{"model_type", c.model_type}, {"hidden_size", c.hidden_size}, {"num_hidden_layers", c.num_hidden_layers},
                 {"vocab_size", c.vocab_size}, {"num_parameters", t.model().params().numel()}}},
      {"batch", {{"global_batch_size", t.global_batch_size()}, {"local_batch_size", t.local_batch_size()}, {"seq_len", seq}}}};
  std::printf("%s\n", j.dump(2).c_str());
  if (!a.out.empty()) {
    std::ofstream f(a.out);
    f << j.dump(2) << "\n";
    if (!f) throw IoError("cannot write " + a.out);
  }
  return 0;
}

}  // namespace am
