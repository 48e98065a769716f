#include "train/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/log.h"
#include "train/trainer.h"

namespace am {

namespace {

ProgressBar* g_bar = nullptr;  // the one bar on the terminal (for the log hook)
void clear_bar() {
  if (g_bar) g_bar->clear();
}

int terminal_columns() {
  winsize w{};
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &w) == 0 && w.ws_col > 20) return w.ws_col;
  return 100;
}

std::string rate(double v) {
  char b[32];
  if (v >= 1e6) std::snprintf(b, sizeof b, "%.2fM", v / 1e6);
  else if (v >= 1e4) std::snprintf(b, sizeof b, "%.1fk", v / 1e3);
  else std::snprintf(b, sizeof b, "%.0f", v);
  return b;
}

}  // namespace

std::string format_duration(double s) {
  if (!(s >= 0) || !std::isfinite(s)) return "?";
  const long t = std::lround(s);
  char b[32];
  if (t >= 3600) std::snprintf(b, sizeof b, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
  else if (t >= 60) std::snprintf(b, sizeof b, "%ldm%02lds", t / 60, t % 60);
  else std::snprintf(b, sizeof b, "%lds", t);
  return b;
}

ProgressBar::ProgressBar(int64_t first, int64_t total, bool enabled) : first_(first), total_(total) {
  const char* term = std::getenv("TERM");
  active_ = enabled && isatty(STDOUT_FILENO) && !(term && std::strcmp(term, "dumb") == 0) && g_bar == nullptr;
  t0_ = std::chrono::steady_clock::now();
  if (!active_) return;
  g_bar = this;
  log::set_before_print(clear_bar);
}

ProgressBar::~ProgressBar() {
  if (!active_) return;
  clear();
  log::set_before_print(nullptr);
  g_bar = nullptr;
}

void ProgressBar::clear() {
  if (!active_ || !drawn_) return;
  std::fputs("\r\033[K", stdout);
  std::fflush(stdout);
  drawn_ = false;
}

void ProgressBar::update(const StepStats& s, double tokens_per_s, double mem_gib) {
  if (!active_) return;
  step_ = s.step;
  epoch_ = s.epoch;
  if (std::isfinite(s.loss)) {
    loss_ema_ = have_loss_ ? 0.9 * loss_ema_ + 0.1 * s.loss : s.loss;
    have_loss_ = true;
  }
  lr_ = s.lr;
  tps_ = tokens_per_s;
  mem_ = mem_gib;
  status_.clear();
  draw();
}

void ProgressBar::status(const std::string& what) {
  if (!active_) return;
  status_ = what;
  draw();
}

void ProgressBar::draw() {
  const int64_t done = step_ >= first_ ? step_ - first_ + 1 : 0, todo = total_ - first_ + 1;
  const double frac = total_ > 0 ? static_cast<double>(step_) / static_cast<double>(total_) : 0.0;
  const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  const double eta = done > 0 ? el / static_cast<double>(done) * static_cast<double>(todo - done) : -1;
  constexpr int kWidth = 20;
  const int fill = static_cast<int>(frac * kWidth);
  std::string bar = "[";
  for (int i = 0; i < kWidth; ++i) bar += i < fill ? '=' : i == fill ? '>' : ' ';
  bar += "]";
  char line[512];
  // Most useful first: a narrow terminal cuts the tail.
  std::snprintf(line, sizeof line, "%s %3d%% step %lld/%lld | ETA %s%s%s | loss %.4f | lr %.2e | %s tok/s | %.1f GiB | epoch %lld",
                bar.c_str(), static_cast<int>(100 * frac), static_cast<long long>(step_), static_cast<long long>(total_),
                done > 0 ? format_duration(eta).c_str() : "?", status_.empty() ? "" : " | ", status_.c_str(),
                have_loss_ ? loss_ema_ : 0.0, lr_, rate(tps_).c_str(), mem_, static_cast<long long>(epoch_));
  std::string out = line;
  const size_t cols = static_cast<size_t>(terminal_columns() - 1);
  if (out.size() > cols) out.resize(cols);  // one terminal line: never wraps (a wrapped bar cannot be erased)
  std::fputs("\r\033[K", stdout);
  std::fputs(out.c_str(), stdout);
  std::fflush(stdout);
  drawn_ = true;
}

}  // namespace am
