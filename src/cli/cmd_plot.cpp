// automodel plot RUN_DIR [RUN_DIR ...] [--out FILE.svg|FILE.png] [--title TEXT]
// Draws the training curves of one or more runs (checkpoint_dir/training.jsonl + validation.jsonl) as SVG
// (io/svg_plot.h); PNG through rsvg-convert when it is installed. Prints the path written.
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"
#include "io/svg_plot.h"

namespace am {

namespace {
namespace fs = std::filesystem;

const char* kShortPlotUsage = "usage: automodel plot RUN_DIR [RUN_DIR ...] [--out FILE.svg] (more: --help)";
const char* kPlotUsage =
    "usage: automodel plot RUN_DIR [RUN_DIR ...] [--out FILE.svg|FILE.png] [--title TEXT]\n"
    "\n"
    "Draws training curves from each RUN_DIR's training.jsonl (and validation.jsonl when present) as one SVG\n"
    "figure: loss (val_loss as markers), learning rate, tokens/s and grad norm against step, runs overlaid in\n"
    "distinct colours and labelled with their directory names. Lines that do not parse are skipped, so a run\n"
    "that is still training can be plotted.\n"
    "\n"
    "  --out FILE    output file (default: RUN_DIR/training.svg for one run, ./training_compare.svg for several);\n"
    "                a .png name is converted with rsvg-convert (package librsvg2-bin), which must be on PATH\n"
    "  --title TEXT  figure title (default: the run labels)\n";

bool ends_with_ci(const std::string& s, const std::string& suf) {
  if (s.size() < suf.size()) return false;
  for (size_t i = 0; i < suf.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[s.size() - suf.size() + i])) != suf[i]) return false;
  return true;
}

std::string find_on_path(const std::string& exe) {
  const char* p = std::getenv("PATH");
  std::string path = p ? p : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    std::string dir = path.substr(start, end - start);
    std::string cand = (dir.empty() ? std::string(".") : dir) + "/" + exe;
    if (::access(cand.c_str(), X_OK) == 0) return cand;
    start = end + 1;
  }
  return "";
}

// Label per run: the directory name, or the path as given when two runs share a name.
std::vector<std::string> run_labels(const std::vector<std::string>& dirs) {
  std::vector<std::string> names;
  for (auto& d : dirs) names.push_back(io::run_label(d));
  std::multiset<std::string> seen(names.begin(), names.end());
  for (size_t i = 0; i < names.size(); ++i)
    if (seen.count(names[i]) > 1) names[i] = dirs[i];
  return names;
}
}  // namespace

int cmd_plot(int argc, char** argv) {
  std::vector<std::string> dirs;
  std::string out, title;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const std::string& name) -> std::string {
      auto eq = a.find('=');
      if (eq != std::string::npos) return a.substr(eq + 1);
      if (i + 1 >= argc) throw UsageError("plot: " + name + " needs a value\n" + kShortPlotUsage);
      return argv[++i];
    };
    auto is = [&](const char* flag) { return a == flag || a.rfind(std::string(flag) + "=", 0) == 0; };
    if (is("--out")) out = value("--out");
    else if (is("--title")) title = value("--title");
    else if (a == "-h" || a == "--help") {
      std::fputs(kPlotUsage, stdout);
      return 0;
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError("plot: unknown argument '" + a + "'\n" + kShortPlotUsage);
    } else {
      dirs.push_back(a);
    }
  }
  if (dirs.empty()) throw UsageError(std::string("plot: at least one RUN_DIR is required\n") + kShortPlotUsage);
  if (out.empty())
    out = dirs.size() == 1 ? (fs::path(dirs[0]) / "training.svg").string() : std::string("training_compare.svg");

  const bool png = ends_with_ci(out, ".png");
  std::string rsvg;
  if (png) {
    rsvg = find_on_path("rsvg-convert");
    if (rsvg.empty())
      throw UsageError("plot: PNG output (" + out +
                       ") needs rsvg-convert on PATH (apt-get install librsvg2-bin); SVG output works without it: "
                       "--out FILE.svg");
  }

  std::vector<std::string> labels = run_labels(dirs);
  std::vector<io::RunSeries> runs;
  for (size_t i = 0; i < dirs.size(); ++i) {
    runs.push_back(io::read_run(dirs[i], labels[i]));
    if (runs.back().skipped_lines)
      std::fprintf(stderr, "plot: %s: skipped %zu unparsable line(s)\n", dirs[i].c_str(), runs.back().skipped_lines);
  }
  if (title.empty()) {
    for (size_t i = 0; i < labels.size(); ++i) title += (i ? " vs " : "") + labels[i];
  }

  if (!png) {
    io::write_training_svg(out, runs, title);
  } else {
    const std::string svg = out + ".svg.tmp." + std::to_string(::getpid());
    const std::string png_tmp = out + ".tmp." + std::to_string(::getpid());
    io::write_training_svg(svg, runs, title);
    pid_t pid = ::fork();
    if (pid == 0) {
      ::execl(rsvg.c_str(), "rsvg-convert", "-f", "png", "-o", png_tmp.c_str(), svg.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    int status = 0;
    if (pid > 0) ::waitpid(pid, &status, 0);
    std::error_code ec;
    fs::remove(svg, ec);
    if (pid < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fs::remove(png_tmp, ec);
      throw IoError("plot: rsvg-convert failed to write " + out);
    }
    fs::rename(png_tmp, out, ec);
    if (ec) throw IoError("plot: cannot rename " + png_tmp + " to " + out + ": " + ec.message());
  }
  std::printf("%s\n", out.c_str());
  return 0;
}

}  // namespace am
