// automodel merge-lora --base DIR --adapter DIR --out DIR
// Merges an HF PEFT LoRA adapter into its base model and writes a plain HF folder (io/lora_merge.h).
// Progress and warnings go to stderr, the one-line summary to stdout.
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "core/error.h"
#include "io/lora_merge.h"

namespace am {

namespace {
const char* kShortUsage = "usage: automodel merge-lora --base DIR --adapter DIR --out DIR (more: --help)";
const char* kMergeLoraUsage =
    "usage: automodel merge-lora --base DIR --adapter DIR --out DIR\n"
    "\n"
    "Merges an HF PEFT LoRA adapter into its base model, as PEFT's merge_and_unload() does:\n"
    "W' = W + scale * (B @ A) for every adapted Linear (scale = lora_alpha / r, or lora_alpha / sqrt(r) with\n"
    "use_rslora; rank_pattern / alpha_pattern, fan_in_fan_out, embeddings, DoRA, lora_bias, modules_to_save),\n"
    "computed in fp32 and rounded to the base's dtype. The output keeps the base's tensor names, shapes, dtypes,\n"
    "shards and index, and copies its config, generation config and tokenizer files. One tensor is in memory at a\n"
    "time.\n"
    "\n"
    "  --base DIR      HF model folder (config.json + model.safetensors or shards), or a hub id in the local cache\n"
    "  --adapter DIR   PEFT adapter folder (adapter_config.json + adapter_model.safetensors)\n"
    "  --out DIR       output folder: must not exist, or be empty; written atomically\n";
}

int cmd_merge_lora(int argc, char** argv) {
  io::LoraMergeOptions opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const std::string& name) -> std::string {
      auto eq = a.find('=');
      if (eq != std::string::npos) return a.substr(eq + 1);
      if (i + 1 >= argc) throw UsageError("merge-lora: " + name + " needs a value\n" + kShortUsage);
      return argv[++i];
    };
    auto is = [&](const char* flag) { return a == flag || a.rfind(std::string(flag) + "=", 0) == 0; };
    if (is("--base")) opt.base = value("--base");
    else if (is("--adapter")) opt.adapter = value("--adapter");
    else if (is("--out")) opt.out = value("--out");
    else if (a == "-h" || a == "--help") {
      std::fputs(kMergeLoraUsage, stdout);
      return 0;
    } else {
      throw UsageError("merge-lora: unknown argument '" + a + "'\n" + kShortUsage);
    }
  }
  for (auto [flag, v] : {std::pair<const char*, const std::string*>{"--base", &opt.base}, {"--adapter", &opt.adapter},
                         {"--out", &opt.out}})
    if (v->empty()) throw UsageError(std::string("merge-lora: ") + flag + " DIR is required\n" + kShortUsage);

  io::LoraMergeResult r = io::merge_lora(opt, [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); });
  std::printf("merge-lora: wrote %s: %zu tensors (%zu merged, %zu replaced from the adapter), %zu other files, %.2f GiB\n",
              r.out_dir.c_str(), r.tensors, r.merged, r.replaced, r.files_copied, r.bytes / 1073741824.0);
  return 0;
}

}  // namespace am
