// Checkpoints (SPEC §4): checkpoint_dir/epoch_E_step_S/ with
//   state/rank_RRRRR-of-WWWWW.safetensors   this rank's fp32 master weights and optimizer state, as pieces
//                                           of whole parameters: "<kind>/<param>@<first element>" (1-D),
//                                           kind = master | exp_avg | exp_avg_sq | momentum_buffer.
//                                           Every rank writes its own file, in parallel; any world size,
//                                           ep_size or strategy reads them back (reshard on load).
//   model/consolidated/                     HF folder in the source's names/dtype (when asked); under data
//                                           parallelism each rank writes the tensors it owns into
//                                           model-000NN-of-000WW.safetensors and rank 0 the index
//   train_state.json                        step, epoch, seed, optimizer step count, world/ep size, strategy,
//                                           the step's grad norm
// written under a temporary name and renamed when complete; checkpoint_dir/LATEST is a symbolic link to the
// newest, swapped atomically (a plain file naming it, as older versions wrote, is still read; so is the
// older model/master.safetensors + optim/optimizer.safetensors state).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "models/lora.h"
#include "models/model.h"
#include "train/optimizer.h"

namespace am {

namespace dist {
class DataParallel;
struct Groups;
}  // namespace dist

struct CheckpointState {
  int64_t step = 0, epoch = 0;
  uint64_t seed = 0;
  int64_t optimizer_steps = 0;
  int world_size = 1, ep_size = 1;
  std::string strategy = "none";
  // The grad norm of the checkpoint's step (before clipping): optimizer_in_bwd clips a step with the previous
  // step's norm (train/optimizer_in_bwd.h), so a resumed run needs it to continue exactly. Absent: not known.
  std::optional<double> last_grad_norm;
};

// Collective when dp is non-null (every rank calls it). Returns the final checkpoint directory.
// Deletes the oldest complete checkpoints (epoch_E_step_S folders, by step) so that `keep` remain; the one
// LATEST points to is never deleted. keep <= 0: nothing is deleted. Returns the folders removed.
std::vector<std::string> prune_checkpoints(const std::string& ckpt_dir, int64_t keep);

// LoRA runs (train/peft.h): model/ holds the PEFT adapter (adapter_config.json + adapter_model.safetensors)
// and model/consolidated/ the merged model, streamed from the base folder by merge-lora's rule.
struct PeftCheckpoint {
  const LoraSpec* spec = nullptr;  // nullptr: full fine-tuning
  std::string base_weights_dir;    // the base model folder ("" for a random init: merged from memory)
};
std::string write_checkpoint(const std::string& ckpt_dir, const CheckpointState& st, CausalLM& model,
                             const Optimizer& optim, bool consolidated, const std::string& source_dir,
                             dist::DataParallel* dp = nullptr, dist::Groups* groups = nullptr,
                             const PeftCheckpoint& peft = {});
// `from` is "LATEST" (resolved through ckpt_dir/LATEST) or a checkpoint path. Throws IoError naming it.
// Fills this rank's master weights (and working copies) and optimizer state, whatever world size wrote it.
CheckpointState read_checkpoint(const std::string& ckpt_dir, const std::string& from, CausalLM& model, Optimizer& optim,
                                dist::DataParallel* dp = nullptr);
// ckpt_dir/LATEST -> the checkpoint folder it names ("" when there is none).
std::string resolve_latest(const std::string& ckpt_dir);

}  // namespace am
