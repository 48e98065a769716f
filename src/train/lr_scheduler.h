// NeMo AutoModel's OptimizerParamScheduler (Megatron's), under AutoModel's recipe keys:
// lr_decay_style (constant | linear | cosine | inverse-square-root), lr_warmup_steps, lr_decay_steps,
// init_lr, max_lr, min_lr, start_wd/end_wd/wd_incr_steps/wd_incr_style. Defaults as AutoModel's builder:
// init_lr = 0.1 lr, max_lr = lr, min_lr = 0.01 lr, warmup = min(1000, total_steps / 10), decay_steps =
// total_steps. The scheduler is evaluated at num_steps = k - 1 for optimizer step k (it is stepped after
// each update, starting from step(0) at construction). No section: constant lr and weight decay.
#pragma once
#include <cstdint>
#include <string>

namespace am {

class Recipe;

class LrScheduler {
 public:
  static LrScheduler from_recipe(const Recipe& r, double base_lr, double base_wd, int64_t total_steps);
  // lr / weight decay for optimizer step k (1-based).
  double lr_at(int64_t step) const;
  double wd_at(int64_t step) const;

  bool enabled = false;
  std::string style = "cosine";
  double init_lr = 0, max_lr = 0, min_lr = 0;
  int64_t warmup_steps = 0, decay_steps = 1;
  double start_wd = 0, end_wd = 0;
  int64_t wd_incr_steps = 1;
  std::string wd_style = "constant";
};

}  // namespace am
