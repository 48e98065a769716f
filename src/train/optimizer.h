// torch.optim.AdamW / Adam / SGD with torch's exact update rules (single-tensor, non-foreach path), over
// fp32 master buffers ("slots"). The update is elementwise, so a slot may be one parameter (one rank) or a
// data-parallel rank's slice of a layer's flat buffer (dist/data_parallel.h): the numbers are the same.
// State is per slot, saved/restored with checkpoints (train/checkpoint.cpp maps it back to parameters).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/adamw_params.h"
#include "models/exec.h"
#include "models/params.h"

namespace am {

class Recipe;

struct OptimizerConfig {
  std::string kind = "adamw";  // adamw | adam | sgd
  double lr = 1e-5;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;
  double momentum = 0.0, dampening = 0.0;
  bool nesterov = false;
  // bf16 parameters (model.dtype: bfloat16): the new parameter rounds stochastically instead of to nearest,
  // with random bits from (seed, parameter, step, element) (backend/cpu/adamw_bf16.h).
  bool stochastic_rounding = false;
  uint64_t seed = 0;
  static OptimizerConfig from_recipe(const Recipe& r);
};

// One buffer the optimizer updates: fp32 master values and their fp32 gradient (same numel), and the bf16
// working copy to refresh after the update (nullptr: none, or the master itself is the working copy).
// Pure bf16 (model.dtype: bfloat16, train/pure_bf16.h) is told by a BF16 gradient: the values are bf16 (on the
// host: fp32 holding bf16 values), the state is made bf16, and the update is backend/cpu/adamw_bf16.h's.
struct OptSlot {
  std::string key;  // names the state: a parameter name, or a bucket's "<unit>/<dense|experts>"
  Tensor* value = nullptr;
  Tensor* grad = nullptr;
  Tensor* work = nullptr;
};

class Optimizer {
 public:
  explicit Optimizer(OptimizerConfig cfg) : cfg_(std::move(cfg)) {}
  // One update of every trainable parameter with learning rate lr and weight decay wd.
  void step(ParamStore& ps, double lr, double wd);
  void step(const std::vector<OptSlot>& slots, double lr, double wd);  // = begin_step() + update(slots, ...)
  // A step taken in parts (optimizer_in_bwd, train/optimizer_in_bwd.h): begin_step counts the step once, then
  // update() applies it to any subset of the slots, each slot once. Same numbers as one step() over them all.
  void begin_step() { ++step_; }
  // fused (CUDA AdamW / Adam only; core/adamw_params.h): the clip scale and the gradients' sum of squares taken in
  // the update's own pass (optimizer_in_bwd). There a pure-bf16 slot (bf16 value) may carry its fp32 gradient.
  void update(const std::vector<OptSlot>& slots, double lr, double wd, const AdamWFused& fused = {});
  // Whether update() can take `fused` for slots on this device (AdamW / Adam on CUDA).
  bool fuses(DeviceType dev) const { return dev == DeviceType::CUDA && cfg_.kind != "sgd"; }
  // One slot per trainable parameter (one rank, no sharding).
  static std::vector<OptSlot> slots_of(ParamStore& ps);
  // p's slot with the gradient `grad`: the working copy is refreshed where it is not the master itself.
  static OptSlot slot_of(Param& p, Tensor* grad);
  // The state buffers of a slot (which: 0 = exp_avg / momentum_buffer, 1 = exp_avg_sq); nullptr before
  // the first step made them. set_state installs one (resume).
  const Tensor* state(const std::string& key, int which) const;
  void set_state(const std::string& key, int which, Tensor t);
  void set_step_count(int64_t n) { step_ = n; }
  const OptimizerConfig& config() const { return cfg_; }
  int64_t step_count() const { return step_; }
  // State tensors by name ("<param>.exp_avg", "<param>.exp_avg_sq", "<param>.momentum_buffer").
  std::vector<std::pair<std::string, Tensor>> state_tensors() const;  // host copies

 private:
  void step_cuda(const std::vector<OptSlot>& slots, double lr, double wd, const AdamWFused& fused);
  void step_bf16(const std::vector<OptSlot>& slots, double lr, double wd, const AdamWFused& fused);
  AdamWHyper hyper(double lr, double wd) const;
  // Slot sl's exp_avg and exp_avg_sq in dtype dt on its device: zeros the first time, converted when a checkpoint
  // left them in another dtype.
  std::pair<Tensor*, Tensor*> adam_state(const OptSlot& sl, DType dt);  // this step's hyper-parameters (the step being taken: step_)

 public:
  // Host tensors from a checkpoint; moved to ex's device.
  void load_state(const std::map<std::string, Tensor>& tensors, int64_t step, const ExecContext& ex);

 private:
  OptimizerConfig cfg_;
  int64_t step_ = 0;
  std::map<std::string, Tensor> m_, v_;  // exp_avg, exp_avg_sq / momentum_buffer in m_
};

}  // namespace am
