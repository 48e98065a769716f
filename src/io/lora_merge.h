// Streaming merge of a PEFT LoRA adapter into an HF model folder (`automodel merge-lora`): the output folder
// has the base's tensors (same names, shapes, dtypes, shard files and index, byte for byte except the adapted
// tensors) with W' = W + scale * (B @ A) by PEFT's merge_and_unload() rule (io/lora_adapter.h), plus the
// base's config, generation config, tokenizer and other small files.
//
// Memory: one base tensor at a time (read, merged in place in its own dtype, written) plus the adapter; the
// unchanged tensors are copied file to file (copy_file_range) without passing through user memory. So a 70B
// model needs memory for its largest adapted tensor, not for the model.
//
// Atomic: everything is written into OUT.tmp-XXXXXX next to OUT and renamed to OUT when complete; on any
// error the temporary folder is removed. An existing OUT must be an empty folder.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "io/lora_adapter.h"

namespace am::io {

struct LoraMergeOptions {
  std::string base;     // HF model folder, or a hub id ("org/name") in the local HF cache
  std::string adapter;  // PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
  std::string out;      // output folder: absent, or an empty folder
};

struct LoraMergeResult {
  std::string base_dir;  // the resolved base folder
  std::string out_dir;
  size_t tensors = 0;         // tensors written
  size_t merged = 0;          // of which changed by LoRA (weights, lora_bias biases)
  size_t replaced = 0;        // of which replaced by an adapter tensor (modules_to_save, trained biases)
  size_t files_copied = 0;    // config, tokenizer and other side files
  uint64_t bytes = 0;         // bytes of safetensors written
  std::vector<std::string> skipped;   // base files not copied (other weight formats, subfolders, ...)
  std::vector<std::string> warnings;  // one line each, also passed to `log`
};

// Reads the adapter, checks it against every base shard header (all errors before anything is written), then
// writes OUT. Errors: UsageError (unsupported adapter feature, OUT not empty: exit 2), IoError / FormatError /
// ShapeError (missing or malformed files, tensors that do not match: exit 1), each naming the tensors and files.
// `log` gets progress and warning lines (nullptr: silent).
LoraMergeResult merge_lora(const LoraMergeOptions& opt, const std::function<void(const std::string&)>& log = nullptr);

// Same with an adapter already in memory (e.g. a trainer's own LoRA weights) and a base folder (no hub lookup).
LoraMergeResult merge_lora(const std::string& base_dir, const LoraAdapter& adapter, const std::string& out_dir,
                           const std::function<void(const std::string&)>& log = nullptr);

}  // namespace am::io
