// `automodel finetune | bench | eval` — recipe-driven commands. Each runs either in this process (one
// process, or a worker some launcher placed: dist::detect_launch) or as the supervisor of the N workers of
// `--nproc-per-node N` (dist::run_workers), which re-run this same command line.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"
#include "dist/launch.h"
#include "dist/supervisor.h"
#include "ops/device.h"
#include "ops/trace.h"
#include "config/recipe.h"
#include "data/dataset.h"
#include "train/model_source.h"
#include "train/trainer.h"

namespace am {

namespace {
struct RecipeArgs {
  bool help = false;
  std::string recipe;
  std::vector<std::string> overrides;
  std::string out;            // bench --out
  int64_t nproc = 1;
  bool nproc_given = false;
  std::vector<std::string> argv;  // the whole command line, for the workers to re-run
};

int64_t parse_nproc(const std::string& flag, const std::string& v) {
  size_t pos = 0;
  int64_t n = 0;
  try {
    n = std::stoll(v, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos == 0 || pos != v.size()) throw UsageError(flag + " '" + v + "': expected an integer");
  if (n < 1) throw UsageError(flag + " " + v + ": must be >= 1");
  return n;
}

// Parses `RECIPE.yaml [--a.b.c=VALUE | --a.b.c VALUE ...] [--nproc-per-node N] [--out F]`, and the older
// `llm -c RECIPE.yaml` form. argv[0] is the command name (or the program, for `automodel RECIPE.yaml`).
RecipeArgs parse_recipe_args(int argc, char** argv, const char* cmd) {
  RecipeArgs a;
  a.argv = {"automodel", cmd};
  for (int i = 1; i < argc; ++i) a.argv.emplace_back(argv[i]);
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto value = [&](const std::string& flag) -> std::string {
      if (i + 1 >= argc) throw UsageError(std::string(cmd) + ": " + flag + " needs a value");
      return argv[++i];
    };
    if (s == "-h" || s == "--help") { a.help = true; return a; }
    if (s == "llm" && a.recipe.empty()) continue;  // `finetune llm -c RECIPE`
    if (s == "-c" || s == "--config") { a.recipe = value(s); continue; }
    if (s == "--nproc-per-node" || s == "--nproc_per_node") {
      a.nproc = parse_nproc(s, value(s));
      a.nproc_given = true;
      continue;
    }
    if (s.rfind("--nproc-per-node=", 0) == 0 || s.rfind("--nproc_per_node=", 0) == 0) {
      a.nproc = parse_nproc(s.substr(0, 16), s.substr(17));
      a.nproc_given = true;
      continue;
    }
    if (s == "--out") { a.out = value(s); continue; }
    if (s.rfind("--out=", 0) == 0) { a.out = s.substr(6); continue; }
    if (s.rfind("--", 0) == 0 && s.size() > 2) {
      // AutoModel's forms: --a.b=VALUE, --a.b VALUE, and a bare --a.b (followed by another flag or nothing)
      // meaning true.
      std::string kv = s.substr(2);
      if (kv.find('=') == std::string::npos) {
        const bool bare = i + 1 >= argc || std::string(argv[i + 1]).rfind("--", 0) == 0;
        kv += "=" + (bare ? std::string("true") : value(s));
      }
      a.overrides.push_back(kv);
      continue;
    }
    if (a.recipe.empty()) { a.recipe = s; continue; }
    throw UsageError(std::string(cmd) + ": unexpected argument '" + s + "'");
  }
  if (a.recipe.empty()) throw UsageError(std::string("usage: automodel ") + cmd + " RECIPE.yaml [--section.key=VALUE ...] (--help for more)");
  return a;
}

int print_recipe_usage(const char* cmd) {
  const std::string c = cmd;
  std::printf("usage: automodel %s RECIPE.yaml [--section.key=VALUE | --section.key VALUE | --section.flag ...]%s%s\n\n", cmd,
              c == "eval" ? "" : " [--nproc-per-node N]", c == "bench" ? " [--out FILE.json]" : "");
  if (c == "finetune")
    std::printf("Fine-tunes the model of a NeMo-AutoModel-style recipe. Also: automodel RECIPE.yaml (runs the recipe's\n"
                "class: TrainFinetuneRecipeForNextTokenPrediction trains, BenchmarkingRecipeForNextTokenPrediction is\n"
                "timed as by `automodel bench`) and automodel finetune llm -c RECIPE.yaml.\n");
  else if (c == "bench")
    std::printf("Times training steps: benchmark.warmup_steps (or step_scheduler.warmup_steps, default 3) untimed,\n"
                "then step_scheduler.timed_steps (default 10; with a benchmark section: max_steps - warmup_steps).\n"
                "Prints the bench JSON (tokens/s, TFLOP/s, MFU, peak memory) and writes it to --out or\n"
                "benchmark.json_output_path.\n");
  else
    std::printf("Prints the validation loss of the recipe's validation_dataset as JSON.\n");
  std::printf("\n"
              "Overrides set any recipe key; VALUE is parsed as YAML (e.g. --step_scheduler.max_steps=100,\n"
              "--optimizer.betas=[0.9,0.95], --model.tokenizer=DIR). Every key and what it does here:\n"
              "docs/recipes.md. Launching on several GPUs or nodes (torchrun, srun, mpirun): docs/distributed.md.\n"
              "Exit status: 0 ok, 2 usage or recipe error, 1 any other failure.\n");
  return 0;
}

bool supervised() {
  const char* s = std::getenv("AUTOMODEL_SUPERVISED");
  return s && *s && std::strcmp(s, "0") != 0;
}

// How many workers this command starts on this machine, and on which device. As AutoModel: without
// --nproc-per-node, cuda (or auto with GPUs) takes every visible GPU; cpu runs one process.
int workers_to_start(const RecipeArgs& a, const Recipe& r, std::string* device_out) {
  const std::string device = r.get_string("device", "auto");
  if (device != "auto" && device != "cpu" && device != "cuda")
    r.fail("device", "expected auto, cpu or cuda, got '" + device + "'");
  std::string why;
  const int gpus = device == "cpu" ? 0 : static_cast<int>(ops::list_gpus(&why).size());
  const bool on_gpu = device != "cpu" && gpus > 0;
  *device_out = on_gpu ? "cuda" : "cpu";
  if (!a.nproc_given) return on_gpu && gpus >= 2 ? gpus : 1;
  const std::string flag = "--nproc-per-node " + std::to_string(a.nproc);
  if (device == "cuda" && gpus == 0)
    throw UsageError(flag + ": device cuda, but no GPU is visible (" + why + ")");
  if (on_gpu && a.nproc > gpus)
    throw UsageError(flag + ": only " + std::to_string(gpus) + (gpus == 1 ? " GPU" : " GPUs") + " visible");
  return static_cast<int>(a.nproc);
}

// Runs `body(recipe, launch)` in this process, or starts and supervises the workers that will. A worker
// registers with the supervisor (pid file) first and reports its exit code last; exceptions still reach
// main(), which prints the one-line error and picks the exit code.
template <class Body>
int run_recipe(const RecipeArgs& a, Body&& body) {
  const dist::LaunchInfo li = dist::detect_launch();
  if (li.world_size == 1 && !supervised()) {
    Recipe r = Recipe::load(a.recipe, a.overrides);
    std::string device;
    const int n = workers_to_start(a, r, &device);
    if (n > 1) {
      check_distributed_recipe(r, n);  // bad distributed: settings stop here, before any worker starts
      return dist::run_workers({.nproc = n, .device = device, .argv = a.argv});
    }
    return body(r, li);
  }
  arm_stop_signals();  // before registering: the supervisor may forward a stop signal as soon as it sees us
  dist::worker_register(li.rank);
  int code = 0;
  try {
    Recipe r = Recipe::load(a.recipe, a.overrides);
    code = body(r, li);
  } catch (const Error& e) {
    dist::worker_report_exit(e.exit_code());
    throw;
  } catch (...) {
    dist::worker_report_exit(1);
    throw;
  }
  dist::worker_report_exit(code);
  return code;
}
}  // namespace

int cmd_finetune(int argc, char** argv) {
  auto a = parse_recipe_args(argc, argv, "finetune");
  if (a.help) return print_recipe_usage("finetune");
  // `automodel RECIPE.yaml` runs the recipe's own class, as AutoModel's CLI does: a benchmarking recipe is timed.
  const bool alias = std::strcmp(argv[0], "finetune") != 0 && std::strcmp(argv[0], "train") != 0;
  if (alias && Recipe::load(a.recipe, a.overrides).recipe_class() == "benchmark") return cmd_bench(argc, argv);
  return run_recipe(a, [alias](const Recipe& r, const dist::LaunchInfo& li) {
    if (!alias && r.recipe_class() == "benchmark" && li.rank == 0)
      log::info(r.where("recipe") + " is a BenchmarkingRecipeForNextTokenPrediction: `automodel finetune` trains it; "
                "`automodel bench` (or `automodel RECIPE.yaml`) times it");
    Trainer t(r, TrainerOptions{.quiet = li.rank != 0, .launch = li});  // rank 0 speaks for the job
    t.train();
    return 0;
  });
}

// automodel dataset RECIPE.yaml [overrides] --out DIR: the samples the recipe trains (and validates) on, built
// exactly as `finetune` builds them (tokenizer, chat template / prompt format, answer-only loss, truncation, packing),
// written as DIR/train.jsonl and DIR/validation.jsonl: one {"input_ids": [...], "labels": [...]} per sample (labels
// aligned with input_ids as in HF; -100 = no loss), plus "seq_lens" for a packed row. What a user inspects before a
// long run, and what the HF side of bench/w4.sh trains on, so that both see the same tokens.
int cmd_dataset(int argc, char** argv) {
  auto a = parse_recipe_args(argc, argv, "dataset");
  if (a.help) {
    std::printf("usage: automodel dataset RECIPE.yaml [--section.key=VALUE ...] --out DIR\n\n"
                "Writes the recipe's training samples (after tokenisation, formatting and packing) to DIR/train.jsonl and,\n"
                "when it has a validation_dataset, its samples to DIR/validation.jsonl: one JSON object per sample,\n"
                "{\"input_ids\": [...], \"labels\": [...]} (labels aligned with input_ids, -100 = no loss; packed rows add\n"
                "\"seq_lens\"). Exit status: 0 ok, 2 usage or recipe error, 1 any other failure.\n");
    return 0;
  }
  if (a.out.empty()) throw UsageError("dataset: --out DIR is required (usage: automodel dataset RECIPE.yaml --out DIR)");
  if (a.nproc_given) throw UsageError("dataset: --nproc-per-node does not apply (the samples are the same on every rank)");
  const auto t0 = std::chrono::steady_clock::now();
  Recipe r = Recipe::load(a.recipe, a.overrides);
  const ModelSource src = resolve_model_source(r);
  DatasetContext dctx;
  dctx.vocab_size = src.cfg.vocab_size;
  dctx.seed = static_cast<uint64_t>(r.get_int("rng.seed", r.get_int("seed", 42)));  // as the trainer seeds it
  dctx.tokenizer_dir = src.tokenizer_dir;
  dctx.default_seq_len =
      std::min<int64_t>(src.cfg.max_position_embeddings > 0 ? src.cfg.max_position_embeddings : 2048, 2048);
  if (!r.has("dataset")) throw RecipeError(r.path() + ": the recipe has no dataset section");
  std::filesystem::create_directories(a.out);
  auto write = [&](const Dataset& ds, const std::string& name) {
    const std::string path = (std::filesystem::path(a.out) / name).string();
    std::ofstream f(path);
    if (!f) throw IoError("dataset: cannot write " + path);
    int64_t tokens = 0, labels = 0;
    for (size_t i = 0; i < ds.size(); ++i) {
      const Sample s = ds.get(i);
      nlohmann::json j = {{"input_ids", s.input_ids}, {"labels", s.labels}};
      if (!s.seq_lens.empty()) j["seq_lens"] = s.seq_lens;
      f << j.dump() << "\n";
      tokens += static_cast<int64_t>(s.input_ids.size());
      for (int32_t l : s.labels) labels += l != -100;
    }
    if (!f) throw IoError("dataset: cannot write " + path);
    log::info("dataset: " + std::to_string(ds.size()) + " samples, " + std::to_string(tokens) + " tokens (" +
              std::to_string(labels) + " with a label) -> " + path);
  };
  std::unique_ptr<Dataset> train = make_dataset(r, "dataset", dctx);
  if (int64_t pack_size = r.get_int("packed_sequence.packed_sequence_size", 0); pack_size > 0) train = pack_dataset(*train, pack_size);
  write(*train, "train.jsonl");
  if (r.has("validation_dataset")) write(*make_dataset(r, "validation_dataset", dctx), "validation.jsonl");
  char took[32];
  std::snprintf(took, sizeof took, "%.2f s", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  log::info(std::string("dataset: done in ") + took);
  return 0;
}

int cmd_eval(int argc, char** argv) {
  auto a = parse_recipe_args(argc, argv, "eval");
  if (a.help) return print_recipe_usage("eval");
  return run_recipe(a, [&](const Recipe& r, const dist::LaunchInfo& li) {
    if (!r.has("validation_dataset")) throw RecipeError(a.recipe + ": eval needs a validation_dataset section");
    Trainer t(r, TrainerOptions{.quiet = true, .launch = li});
    int64_t n = 0;
    double loss = t.validate(&n);
    nlohmann::json j = {{"val_loss", loss}, {"num_label_tokens", n}};
    if (li.rank == 0) std::printf("%s\n", j.dump().c_str());
    return 0;
  });
}

namespace {
int bench_body(const RecipeArgs& a, Recipe& r, const dist::LaunchInfo& li) {
  Trainer t(r, TrainerOptions{.quiet = true, .launch = li});
  // AutoModel's benchmark section: warmup_steps untimed, the rest of max_steps timed.
  const std::string warm_key = r.has("benchmark.warmup_steps") ? "benchmark.warmup_steps" : "step_scheduler.warmup_steps";
  const int64_t warm = r.get_int(warm_key, 3);
  int64_t timed = r.get_int("step_scheduler.timed_steps", 10);
  if (!r.has("step_scheduler.timed_steps") && r.has("benchmark") && r.has("step_scheduler.max_steps"))
    timed = r.get_int("step_scheduler.max_steps", 0) - warm;
  if (warm < 0) r.fail(warm_key, "must be >= 0");
  if (timed < 1)
    r.fail(r.has("step_scheduler.timed_steps") ? "step_scheduler.timed_steps" : "step_scheduler.max_steps",
           "leaves " + std::to_string(timed) + " timed steps after " + std::to_string(warm) + " warm-up steps (need >= 1)");
  t.run_steps(warm);
  t.reset_peak_mem();
  ops::trace_times_reset();  // AM_TRACE_TIMES=1: time only the timed steps
  auto stats = t.run_steps(timed);
  double step_s = 0, fb = 0, opt = 0, tokens = 0, seq = 0;
  for (auto& s : stats) {
    step_s += s.time_s;
    fb += s.fwd_bwd_s;
    opt += s.opt_s;
    tokens += s.num_tokens;
  }
  seq = tokens / (static_cast<double>(timed) * t.global_batch_size());
  const double tps = tokens / step_s;  // the whole job's tokens (StepStats are global)
  const double tps_gpu = tps / li.world_size;
  const double tflops = tps_gpu * t.flops_per_token(seq) / 1e12;
  double peak_mem = 0;  // the largest rank's
  for (auto& s : stats) peak_mem = std::max(peak_mem, s.mem_gib);
  const auto& c = t.model().config();
  // benchmark.peak_tflops (AutoModel) replaces the device's dense bf16 peak as the MFU denominator.
  const double peak = r.has("benchmark.peak_tflops") ? r.get_double("benchmark.peak_tflops", 0) * 1e12 : t.peak_flops();
  nlohmann::json j = {
      {"tokens_per_s", tps}, {"tokens_per_s_per_gpu", tps_gpu}, {"tflops_per_gpu", tflops},
      {"mfu", peak > 0 ? nlohmann::json(tflops * 1e12 / peak) : nlohmann::json(nullptr)},
      {"peak_mem_gib", peak_mem}, {"gpu", t.gpu_name()},
      {"step_ms", 1e3 * step_s / timed}, {"fwd_ms", nullptr}, {"bwd_ms", nullptr},
      {"fwd_bwd_ms", 1e3 * fb / timed}, {"opt_ms", 1e3 * opt / timed}, {"world_size", li.world_size},
      // the last timed step's loss and grad norm (%.9g): an A/B of a speed switch shows there whether it changed the numbers
      {"last_loss", stats.empty() ? 0.0 : stats.back().loss}, {"last_grad_norm", stats.empty() ? 0.0 : stats.back().grad_norm},
      {"device", t.device_name()}, {"warmup_steps", warm}, {"timed_steps", timed},
      {"model", {{"model_type", c.model_type}, {"hidden_size", c.hidden_size}, {"num_hidden_layers", c.num_hidden_layers},
                 {"vocab_size", c.vocab_size}, {"num_parameters", t.model().params().global_numel()}}},
      {"batch", {{"global_batch_size", t.global_batch_size()}, {"local_batch_size", t.local_batch_size()}, {"seq_len", seq}}}};
  // AM_TRACE_TIMES=1 (ops/trace.h): GPU milliseconds per timed step of each named span, and its count per step.
  if (ops::trace_times_enabled()) {
    nlohmann::json g = nlohmann::json::object();
    for (const auto& [name, v] : ops::trace_times())
      g[name] = {{"ms_per_step", v.first / static_cast<double>(timed)}, {"calls_per_step", static_cast<double>(v.second) / static_cast<double>(timed)}};
    j["gpu_time_per_step"] = g;
  }
  if (li.rank != 0) return 0;  // one report for the job
  std::printf("%s\n", j.dump(2).c_str());
  const std::string out = !a.out.empty() ? a.out : r.get_string("benchmark.json_output_path", "");
  if (!out.empty()) {
    std::ofstream f(out);
    f << j.dump(2) << "\n";
    if (!f) throw IoError("cannot write " + out);
  }
  return 0;
}
}  // namespace

int cmd_bench(int argc, char** argv) {
  auto a = parse_recipe_args(argc, argv, "bench");
  if (a.help) return print_recipe_usage("bench");
  return run_recipe(a, [&](Recipe& r, const dist::LaunchInfo& li) { return bench_body(a, r, li); });
}

}  // namespace am
