// torch.optim.AdamW / Adam / SGD with torch's exact update rules (single-tensor, non-foreach path), over
// the fp32 master weights of a ParamStore. State is per parameter, saved/restored with checkpoints.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

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
  static OptimizerConfig from_recipe(const Recipe& r);
};

class Optimizer {
 public:
  explicit Optimizer(OptimizerConfig cfg) : cfg_(std::move(cfg)) {}
  // One update of every trainable parameter with learning rate lr and weight decay wd.
  void step(ParamStore& ps, double lr, double wd);
  const OptimizerConfig& config() const { return cfg_; }
  int64_t step_count() const { return step_; }
  // State tensors by name ("<param>.exp_avg", "<param>.exp_avg_sq", "<param>.momentum_buffer").
  std::vector<std::pair<std::string, Tensor>> state_tensors() const;  // host copies

 private:
  void step_cuda(ParamStore& ps, double lr, double wd);

 public:
  // Host tensors from a checkpoint; moved to ex's device.
  void load_state(const std::map<std::string, Tensor>& tensors, int64_t step, const ExecContext& ex);

 private:
  OptimizerConfig cfg_;
  int64_t step_ = 0;
  std::map<std::string, Tensor> m_, v_;  // exp_avg, exp_avg_sq / momentum_buffer in m_
};

}  // namespace am
