// Checkpoints (SPEC §4): checkpoint_dir/epoch_E_step_S/ with
//   model/master.safetensors       fp32 master weights (exact resume)
//   model/consolidated/            HF folder in the source's names/dtype (when asked)
//   optim/optimizer.safetensors    optimizer state tensors
//   train_state.json               step, epoch, seed, optimizer step count
// written under a temporary name and renamed when complete; checkpoint_dir/LATEST names the newest.
#pragma once
#include <cstdint>
#include <string>

#include "models/model.h"
#include "train/optimizer.h"

namespace am {

struct CheckpointState {
  int64_t step = 0, epoch = 0;
  uint64_t seed = 0;
  int64_t optimizer_steps = 0;
};

// Returns the final checkpoint directory.
std::string write_checkpoint(const std::string& ckpt_dir, const CheckpointState& st, const CausalLM& model,
                             const Optimizer& optim, bool consolidated, const std::string& source_dir);
// `from` is "LATEST" (resolved through ckpt_dir/LATEST) or a checkpoint path. Throws IoError naming it.
CheckpointState read_checkpoint(const std::string& ckpt_dir, const std::string& from, CausalLM& model, Optimizer& optim);

}  // namespace am
