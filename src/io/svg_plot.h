// Training curves as a dependency-free SVG 1.1 figure (docs/plots.md).
// read_run() loads checkpoint_dir/training.jsonl (+ optional validation.jsonl); render_training_svg() draws
// a 2x2 grid: loss (+ val_loss markers), learning rate, tokens/s and grad norm against step, several runs
// overlaid in distinct colours with a legend of their labels.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace am::io {

// One optimizer step from training.jsonl. A field that is absent, null or not a number is NaN.
struct TrainPoint {
  double step = 0, loss = 0, grad_norm = 0, lr = 0, tps = 0, mem_gib = 0;
};
// One validation pass from validation.jsonl.
struct ValPoint {
  double step = 0, val_loss = 0;
};

struct RunSeries {
  std::string label;
  std::vector<TrainPoint> train;  // sorted by step
  std::vector<ValPoint> val;      // sorted by step; empty when validation.jsonl is missing
  size_t skipped_lines = 0;       // lines that did not parse as a JSON object with a numeric "step"
};

// Reads dir/training.jsonl (required: IoError naming the path when it cannot be opened) and
// dir/validation.jsonl (optional). Unparsable lines are skipped: the run may be mid-write.
// An empty label becomes the directory's name.
RunSeries read_run(const std::string& dir, const std::string& label = "");

// The default label of a run: its directory's name ("runs/a/" -> "a"; "." -> the current directory's name).
std::string run_label(const std::string& dir);

// The whole figure (about 900 x 600) as an SVG document. Non-finite values are skipped; constant series and
// single points get a non-zero axis range. Never throws for odd data.
std::string render_training_svg(const std::vector<RunSeries>& runs, const std::string& title);

// render_training_svg() written atomically (path.tmp.PID, then rename). IoError naming the path on failure.
void write_training_svg(const std::string& path, const std::vector<RunSeries>& runs, const std::string& title);

// Convenience for the trainer: read_run(dir) and write dir/training.svg; returns the path written.
// Throws IoError like the two above (callers that must not fail should catch am::Error).
std::string plot_run_dir(const std::string& dir, const std::string& title = "");

}  // namespace am::io
