#include "train/lr_scheduler.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "config/recipe.h"

namespace am {

LrScheduler LrScheduler::from_recipe(const Recipe& r, double base_lr, double base_wd, int64_t total_steps) {
  LrScheduler s;
  s.max_lr = s.init_lr = s.min_lr = base_lr;
  s.start_wd = s.end_wd = base_wd;
  if (!r.has("lr_scheduler")) return s;
  s.enabled = true;
  s.style = r.get_string("lr_scheduler.lr_decay_style", "cosine");
  if (s.style != "constant" && s.style != "linear" && s.style != "cosine" && s.style != "inverse-square-root")
    r.fail("lr_scheduler.lr_decay_style", "unsupported style '" + s.style + "' (constant, linear, cosine, inverse-square-root)");
  s.init_lr = r.get_double("lr_scheduler.init_lr", base_lr * 0.1);
  s.max_lr = r.get_double("lr_scheduler.max_lr", base_lr);
  s.min_lr = r.get_double("lr_scheduler.min_lr", base_lr * 0.01);
  s.warmup_steps = r.get_int("lr_scheduler.lr_warmup_steps", std::min<int64_t>(1000, total_steps / 10));
  s.decay_steps = r.get_int("lr_scheduler.lr_decay_steps", total_steps);
  s.start_wd = r.get_double("lr_scheduler.start_wd", base_wd);
  s.end_wd = r.get_double("lr_scheduler.end_wd", base_wd);
  s.wd_incr_steps = r.get_int("lr_scheduler.wd_incr_steps", total_steps);
  s.wd_style = r.get_string("lr_scheduler.wd_incr_style", "constant");
  if (s.wd_style != "constant" && s.wd_style != "linear" && s.wd_style != "cosine")
    r.fail("lr_scheduler.wd_incr_style", "unsupported style '" + s.wd_style + "' (constant, linear, cosine)");
  if (s.decay_steps <= 0) r.fail("lr_scheduler.lr_decay_steps", "must be > 0");
  if (s.warmup_steps < 0) r.fail("lr_scheduler.lr_warmup_steps", "must be >= 0");
  if (s.wd_style != "constant" && s.wd_incr_steps <= 0) r.fail("lr_scheduler.wd_incr_steps", "must be > 0 with wd_incr_style " + s.wd_style);
  for (double v : {s.init_lr, s.max_lr, s.min_lr, s.start_wd, s.end_wd})
    if (!std::isfinite(v)) r.fail("lr_scheduler", "learning rates and weight decays must be finite numbers");
  if (s.warmup_steps >= s.decay_steps && s.style != "constant") {
    if (r.has("lr_scheduler.lr_decay_steps"))
      r.fail("lr_scheduler.lr_warmup_steps", "must be smaller than lr_decay_steps (" + std::to_string(s.decay_steps) + ")");
    // lr_decay_steps defaults to the run's length: a short run (a recipe tried with a small max_steps) is all
    // warm-up, which lr_at computes as it would have (AutoModel's scheduler asserts here instead).
    log::warn(r.where("lr_scheduler.lr_warmup_steps") + " (" + std::to_string(s.warmup_steps) + ") is not shorter than the run (" +
              std::to_string(s.decay_steps) + " steps): the whole run is warm-up and the learning rate never decays");
  }
  if (s.min_lr < 0 || s.max_lr < s.min_lr || s.init_lr > s.max_lr)
    r.fail("lr_scheduler", "need 0 <= min_lr <= max_lr and init_lr <= max_lr");
  return s;
}

double LrScheduler::lr_at(int64_t step) const {
  if (!enabled) return max_lr;
  const double n = static_cast<double>(step - 1);
  if (warmup_steps > 0 && n <= warmup_steps) return init_lr + (max_lr - init_lr) * n / static_cast<double>(warmup_steps);
  if (style == "constant") return max_lr;
  if (n > decay_steps) return min_lr;
  if (style == "inverse-square-root") {
    double w = std::max<double>(warmup_steps, 1), s = std::max<double>(n, 1);
    return std::max(min_lr, max_lr * std::sqrt(w) / std::sqrt(s));
  }
  double ratio = (n - warmup_steps) / static_cast<double>(decay_steps - warmup_steps);
  double coeff = style == "linear" ? 1.0 - ratio : 0.5 * (std::cos(M_PI * ratio) + 1.0);
  return min_lr + coeff * (max_lr - min_lr);
}

double LrScheduler::wd_at(int64_t step) const {
  if (!enabled) return end_wd;
  const double n = static_cast<double>(step - 1);
  if (n > wd_incr_steps || wd_style == "constant") return end_wd;
  double ratio = n / static_cast<double>(wd_incr_steps);
  double coeff = wd_style == "linear" ? ratio : 0.5 * (std::cos(M_PI * (1 - ratio)) + 1.0);
  return start_wd + coeff * (end_wd - start_wd);
}

}  // namespace am
