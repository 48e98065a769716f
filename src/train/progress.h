// The live progress line of a training run on a terminal (SPEC §5, issue 18): rank 0 and stdout a TTY only;
// a redirected run prints exactly the plain step lines it always did.
//   [=======>            ]  37% step 148/400 | ETA 3m12s | loss 2.4912 | lr 9.80e-06 | 66.4k tok/s | 12.8 GiB | epoch 0
// The loss shown is smoothed (an exponential moving average over steps, as TensorBoard's smoothing); the
// step lines keep the raw values. Anything else printed (step lines, log::info / warn) first erases the
// bar, which is redrawn after.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace am {

struct StepStats;

class ProgressBar {
 public:
  // Draws nothing unless `enabled` (the caller: rank 0, console output on) and stdout is a terminal whose
  // TERM is not "dumb". Steps first .. total.
  ProgressBar(int64_t first, int64_t total, bool enabled);
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;
  bool active() const { return active_; }
  void update(const StepStats& s, double tokens_per_s, double mem_gib);  // after each step
  void status(const std::string& what);  // e.g. "saving checkpoint…": shown until the next update
  void clear();                          // erases the line (before other output on the terminal)

 private:
  void draw();
  bool active_ = false, drawn_ = false;
  int64_t first_ = 1, total_ = 0, step_ = 0, epoch_ = 0;
  double loss_ema_ = 0, lr_ = 0, tps_ = 0, mem_ = 0;
  bool have_loss_ = false;
  std::string status_;
  std::chrono::steady_clock::time_point t0_;
};

// "3m12s", "1h04m", "42s": durations for humans.
std::string format_duration(double seconds);

}  // namespace am
