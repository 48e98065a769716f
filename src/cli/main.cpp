// automodel CLI: dispatches subcommands and maps errors to exit codes (SPEC §1): 0 ok, 2 usage/recipe,
// 1 anything else. Nothing escapes as a bare exception or abort.
#include <cblas.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "backend/cuda/cudnn_attention.h"
#include "backend/cuda/device_info.h"
#include "cli/commands.h"
#include "core/error.h"
#include "dist/communicator.h"
#include "models/model.h"

namespace am {

static const char* kUsage =
    "automodel " AM_VERSION " - fine-tune Hugging Face causal LMs (C++/CUDA)\n"
    "\n"
    "usage:\n"
    "  automodel finetune RECIPE.yaml [--section.key=VALUE ...]   (also: automodel RECIPE.yaml, automodel finetune llm -c RECIPE.yaml)\n"
    "  automodel bench RECIPE.yaml [...] [--out FILE.json]\n"
    "  automodel eval RECIPE.yaml [...]\n"
    "  automodel dataset RECIPE.yaml [...] --out DIR   (the samples a recipe trains on, as JSONL)\n"
    "  automodel tokenize --tokenizer DIR [--add-special-tokens] [--decode] --jsonl FILE|-\n"
    "  automodel chat-template --tokenizer DIR [--add-generation-prompt] --jsonl FILE|-\n"
    "  automodel generate --model DIR (--prompt TEXT | --chat TEXT) [...]\n"
    "  automodel merge-lora --base DIR --adapter DIR --out DIR\n"
    "  automodel plot RUN_DIR [RUN_DIR ...] [--out FILE.svg]\n"
    "  automodel info\n";

int cmd_info(int, char**) {
  std::printf("automodel %s\n", AM_VERSION);
  std::string why;
  auto devs = cuda::list_devices(&why);
  std::printf("features: cpu (OpenBLAS, OpenMP)%s\n", cuda::built_with_cuda() ? ", cuda (cuBLASLt)" : "");
  if (cuda::built_with_cuda()) std::printf("cuda: %s\n", cuda::runtime_versions().c_str());
  std::printf("cudnn: %s   nccl: %s   mpi: %s\n",
              cuda::kCudnnAttentionCompiled ? "attention for fixed shapes (AM_ATTENTION=auto|cudnn|flash)" : "no",
              dist::built_with_nccl() ? "yes" : "no", dist::built_with_mpi() ? "yes" : "no");
  std::printf("models: ");
  bool first = true;
  for (auto& t : supported_model_types()) {
    std::printf("%s%s", first ? "" : ", ", t.c_str());
    first = false;
  }
  std::printf("\ndevices:\n  cpu\n");
  for (auto& d : devs)
    std::printf("  cuda:%d %s (sm_%d%d, %d SMs) %.1f GiB total, %.1f GiB free\n", d.index, d.name.c_str(), d.cc_major,
                d.cc_minor, d.sm_count, d.total_bytes / 1073741824.0, d.free_bytes / 1073741824.0);
  if (devs.empty()) std::printf("  (no GPU: %s)\n", why.c_str());
  return 0;
}

static int dispatch(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "help")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  if (cmd == "--version" || cmd == "version") {
    std::printf("automodel %s\n", AM_VERSION);
    return 0;
  }
  int sub_argc = argc - 1;
  char** sub_argv = argv + 1;
  if (cmd == "finetune" || cmd == "train") return cmd_finetune(sub_argc, sub_argv);
  if (cmd == "bench") return cmd_bench(sub_argc, sub_argv);
  if (cmd == "eval") return cmd_eval(sub_argc, sub_argv);
  if (cmd == "dataset") return cmd_dataset(sub_argc, sub_argv);
  if (cmd == "info") return cmd_info(sub_argc, sub_argv);
  if (cmd == "tokenize") return cmd_tokenize(sub_argc, sub_argv);
  if (cmd == "chat-template") return cmd_chat_template(sub_argc, sub_argv);
  if (cmd == "generate") return cmd_generate(sub_argc, sub_argv);
  if (cmd == "merge-lora") return cmd_merge_lora(sub_argc, sub_argv);
  if (cmd == "plot") return cmd_plot(sub_argc, sub_argv);
  // Alias: `automodel RECIPE.yaml ...`
  if (cmd.size() > 5 && (cmd.ends_with(".yaml") || cmd.ends_with(".yml"))) return cmd_finetune(argc, argv);
  throw UsageError("unknown command '" + cmd + "' (run `automodel --help`)");
}

}  // namespace am

// OpenBLAS picks its kernels from CPUID at load time; on VMs that hide the CPU model it falls back to the
// generic "Prescott" (SSE3) kernels, 2-2.5x slower than the AVX2/AVX-512 ones the CPU actually has (measured
// on the CI machine type). OPENBLAS_CORETYPE is only read at load time, so set it and re-exec once.
static void maybe_fix_blas_coretype(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") || std::getenv("AM_BLAS_REEXEC")) return;
  const char* core = openblas_get_corename();
  if (!core || std::strcmp(core, "Prescott") != 0) return;
  const char* want = __builtin_cpu_supports("avx512f") ? "SkylakeX" : __builtin_cpu_supports("avx2") ? "Haswell" : nullptr;
  if (!want) return;
  setenv("OPENBLAS_CORETYPE", want, 1);
  setenv("AM_BLAS_REEXEC", "1", 1);
  execv("/proc/self/exe", argv);  // only returns on failure: carry on with the slow kernels
}

int main(int argc, char** argv) {
  maybe_fix_blas_coretype(argv);
  try {
    return am::dispatch(argc, argv);
  } catch (const am::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return e.exit_code();
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (...) {
    std::fprintf(stderr, "error: unknown failure\n");
    return 1;
  }
}
