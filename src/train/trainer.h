// The fine-tuning loop of SPEC §3: global batches cut into micro-batches, loss normalised by the label
// tokens of the whole global batch, grad norm before clipping, optimizer + schedule, logs, checkpoints
// (atomic, with LATEST) and exact resume.
#pragma once
#include <nlohmann/json.hpp>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/dataset.h"
#include "dist/data_parallel.h"
#include "dist/launch.h"
#include "models/lora.h"
#include "models/model.h"
#include "train/lr_scheduler.h"
#include "train/optimizer.h"
#include "train/optimizer_in_bwd.h"
#include "train/pure_bf16.h"
#include "config/recipe.h"

namespace am {

class ProgressBar;  // train/progress.h
namespace io {
class TensorBoardWriter;  // io/tensorboard.h
}

struct TrainerOptions {
  bool quiet = false;  // no per-step console line (tests)
  // Where this process stands in the job (dist/launch.h); world 1 by default. With world > 1 the trainer
  // makes the communicators (MPI for device cpu, NCCL for cuda), shards the model (distributed:) and takes
  // its share of every global batch; every rank must construct and drive its Trainer in the same way.
  dist::LaunchInfo launch;
  // Run the data-parallel code paths even at world 1 (tests, the one-GPU check of the NCCL path).
  bool force_distributed = false;
};

struct StepStats {
  int64_t step = 0, epoch = 0;
  double loss = 0, grad_norm = 0, lr = 0;
  int64_t num_label_tokens = 0, num_tokens = 0, padded_tokens = 0;
  double time_s = 0, fwd_bwd_s = 0, opt_s = 0;
  double mem_gib = 0;  // peak allocator bytes, the largest of any rank
  nlohmann::json extra = nlohmann::json::object();  // model metrics (MoE utilisation, router aux loss)
};

// The batch of a step as AutoModel reads it: global_batch_size, local_batch_size, and dataloader.batch_size
// (the loader's micro-batch; when it differs from local_batch_size a step takes gbs / lbs of them) or, with
// `batch_size: null` and a mock dataset that batches itself, the dataset's batch_size.
// validation_dataloader.batch_size is the validation micro-batch (default: the training one).
struct BatchShape {
  int64_t gbs = 32, lbs = 8, val_lbs = 8;
  std::string note;  // a line to print when dataloader.batch_size changed the step's sample count
};
BatchShape batch_shape(const Recipe& r);

// Whether optimizer_in_bwd, left unset, is on (train/optimizer_in_bwd.h): where it changes no update and only saves
// memory and passes: CUDA, one rank, one micro-batch per step (global == local batch), no clip_grad_norm, full
// fine-tuning.
bool optimizer_in_bwd_is_exact(const Recipe& r, const std::string& device, int world);

// The distributed: section against a world size (and the model's config when given): UsageError (exit 2)
// naming the key for ep_size not dividing the world or the experts, a dp_size that contradicts the world, a
// bad strategy, a global batch that does not split over the ranks. tp/cp/pp sizes > 1 only warn (the recipe
// reader does): every rank runs data parallel. The supervisor calls the second form before starting workers.
void check_distributed_recipe(const Recipe& r, int world, const io::ModelConfig* cfg);
void check_distributed_recipe(const Recipe& r, int world);

// Installs the training loop's stop-signal handlers now (SIGTERM, SIGINT, SIGUSR1, SIGHUP: finish the step,
// save, exit 0). A launched worker calls it before it registers with the supervisor, so that a signal
// forwarded while the model is still being built is kept and honoured at the first step boundary instead of
// killing the worker or being lost.
void arm_stop_signals();

class Trainer {
 public:
  explicit Trainer(const Recipe& recipe, TrainerOptions opt = {});
  ~Trainer();
  // Runs training to the end (max_steps or num_epochs). Returns the stats of every step run.
  std::vector<StepStats> train();
  // Validation loss over validation_dataset (sum CE / label tokens).
  double validate(int64_t* num_label_tokens = nullptr);
  // Runs `warmup` + `timed` steps without checkpoints or logs; fills per-phase timings.
  std::vector<StepStats> run_steps(int64_t n);

  CausalLM& model() { return *model_; }
  int64_t total_steps() const { return total_steps_; }
  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  int64_t global_batch_size() const { return gbs_; }
  int64_t local_batch_size() const { return lbs_; }
  const std::string& device_name() const { return device_name_; }
  double flops_per_token(double seq_len) const;
  double peak_mem_gib() const;
  void reset_peak_mem();
  double peak_flops() const;
  double mfu_of(double tps, const StepStats& s) const;
  const std::string& gpu_name() const { return gpu_name_; }
  int rank() const { return rank_; }
  int world_size() const { return world_; }
  dist::DataParallel* data_parallel() { return dp_.get(); }

 private:
  // Wall time of each start-up phase (setup(): CUDA init, model build + weights, upload, datasets, the rest), logged
  // once before the first step: what a run spends before training (BENCH.md W4 counts it in its wall time).
  std::vector<std::pair<std::string, double>> startup_;
  void setup();
  StepStats train_step(int64_t step);
  // Sample order of an epoch; cached, since every step of the epoch needs it.
  const std::vector<size_t>& epoch_order(int64_t epoch);
  void setup_distributed(const io::ModelConfig& cfg);
  // Rank `rank`'s micro-batches of `samples` (a global batch): a contiguous 1/world share cut into
  // local_batch_size pieces. Every rank gets the same number of micro-batches (the collectives inside
  // forward/backward must match); a rank short of samples gets padding-only ones (nullptr entries).
  std::vector<std::vector<const Sample*>> my_micro_batches(const std::vector<const Sample*>& samples, int rank,
                                                          int64_t micro = 0) const;  // 0: lbs_
  void save_checkpoint(int64_t step, bool final);
  void restore(const std::string& from);
  void setup_lora();
  void print_summary(double wall_s, int64_t last_step) const;  // end of train(), rank 0
  void write_plot() const;  // checkpoint_dir/training.svg (rank 0), at checkpoints and the end  // the peft section: LoRA on the loaded base (train/peft.h)
  void log_step(const StepStats& s);
  std::string model_source_dir() const;

  const Recipe& r_;
  TrainerOptions opt_;
  std::unique_ptr<dist::Groups> groups_;      // world > 1 (or forced): the communicators
  std::unique_ptr<CausalLM> model_;
  std::unique_ptr<dist::DataParallel> dp_;    // declared after model_: destroyed first
  std::unique_ptr<PureBf16> pure_;            // model.dtype: bfloat16 on one rank (train/pure_bf16.h)
  // optimizer_in_bwd: true (train/optimizer_in_bwd.h); after model_, so destroyed first (it unsets the model's hooks)
  std::unique_ptr<OptimizerInBackward> in_bwd_opt_;
  std::optional<double> last_grad_norm_;      // the previous step's (optimizer_in_bwd clips with it; checkpoints)
  int rank_ = 0, world_ = 1, ep_size_ = 1;
  std::string strategy_name_ = "none";
  std::unique_ptr<Dataset> train_ds_, val_ds_;
  std::unique_ptr<Optimizer> optim_;
  LrScheduler sched_;
  std::string source_dir_, tokenizer_dir_, device_name_ = "cpu", gpu_name_;
  CollateOptions collate_, val_collate_;  // padding of training / validation micro-batches
  int64_t keep_last_n_ = 0;        // checkpoint.keep_last_n (0: keep all)
  bool ckpt_every_epoch_ = true;    // step_scheduler.save_checkpoint_every_epoch
  uint64_t seed_ = 42;       // model init, mock data (rng.seed, else seed)
  uint64_t data_seed_ = 42;  // shuffling (seed, else rng.seed)
  int64_t gbs_ = 1, lbs_ = 1, val_lbs_ = 1, epochs_ = 1, total_steps_ = 0, steps_per_epoch_ = 0;
  int64_t ckpt_every_ = 0, val_every_ = 0;
  int64_t start_step_ = 1;
  bool shuffle_ = false, drop_last_ = false;
  std::optional<double> max_norm_;
  std::optional<LoraSpec> lora_spec_;
  bool bnb4_base_ = false;
  // Console: step lines every log_every_ steps, the terminal's progress bar (train() only), the summary's sums.
  int64_t log_every_ = 1;
  ProgressBar* bar_ = nullptr;
  int64_t run_tokens_ = 0;
  double run_time_s_ = 0, run_mfu_time_ = 0, peak_mem_ = 0, last_loss_ = 0;
  double val_s_ = 0, ckpt_s_ = 0;  // this run's wall seconds validating and saving (print_summary's time line)
  int64_t val_runs_ = 0, ckpt_runs_ = 0;
  std::optional<double> last_val_loss_;
  std::string tb_dir_;                          // tensorboard: event files go here ("" = off)
  std::unique_ptr<io::TensorBoardWriter> tb_;   // rank 0, during train()  // the source folder holds bitsandbytes 4-bit weights  // the peft section (LoRA); empty: full fine-tuning
  bool ckpt_enabled_ = true;
  std::string ckpt_dir_, save_consolidated_ = "final";
  ForwardOptions fwd_opt_;
  int64_t order_epoch_ = -1;
  std::vector<size_t> order_;
};

}  // namespace am
