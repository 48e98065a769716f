// Training curves as SVG (svg_plot.h). Plain string building; coordinates are only ever computed from finite
// values over a non-empty axis range, so the output never contains "nan" or "inf".
#include "io/svg_plot.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace am::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double num(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number()) return kNaN;
  return it->get<double>();
}

// Calls f(obj) for every line of `path` that parses as a JSON object; returns the number of lines skipped.
template <class F>
size_t for_each_object(std::ifstream& in, F&& f) {
  size_t skipped = 0;
  std::string line;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !std::isfinite(num(j, "step"))) {
      ++skipped;
      continue;
    }
    f(j);
  }
  return skipped;
}

std::string xml_escape(const std::string& s) {
  std::string o;
  o.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 && c != '\t') o += ' ';  // not allowed in XML 1.0
        else o += c;
    }
  }
  return o;
}

std::string f1(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", v);
  return b;
}

struct Axis {
  double lo = 0, hi = 1, step = 0.2;
};

// "Nice" bounds and tick step (1, 2, 5 x 10^k) covering [mn, mx]; never a zero range.
Axis nice_axis(double mn, double mx, bool integer_ticks, int target = 5) {
  if (!std::isfinite(mn) || !std::isfinite(mx)) mn = 0, mx = 1;
  if (mx < mn) std::swap(mn, mx);
  if (mx - mn <= std::max(std::fabs(mn), std::fabs(mx)) * 1e-9 || mx - mn < 1e-300) {
    double d = mn == 0 ? 1.0 : std::fabs(mn) * 0.1;
    if (integer_ticks) d = std::max(d, 1.0);
    mn -= d, mx += d;
  }
  double raw = (mx - mn) / target;
  double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double f = raw / mag;
  double step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
  if (integer_ticks) step = std::max(step, 1.0);
  Axis a;
  a.step = step;
  a.lo = std::floor(mn / step + 1e-9) * step;
  a.hi = std::ceil(mx / step - 1e-9) * step;
  if (a.hi <= a.lo) a.hi = a.lo + step;
  if (!std::isfinite(a.lo) || !std::isfinite(a.hi) || !(a.hi > a.lo)) a = Axis{};
  return a;
}

std::string strip_zeros(std::string s) {
  if (s.find('.') == std::string::npos) return s;
  while (!s.empty() && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

std::string fmt_tick(double v, const Axis& a) {
  char b[64];
  if (std::fabs(v) < a.step * 1e-6) return "0";
  double amax = std::max(std::fabs(a.lo), std::fabs(a.hi));
  int step_exp = static_cast<int>(std::floor(std::log10(a.step) + 1e-9));
  if (amax >= 1e4 && a.step >= 10) {  // 12.5k, 1.2M
    double unit = amax >= 1e7 && a.step >= 1e4 ? 1e6 : 1e3;
    int d = std::max(0, static_cast<int>(std::log10(unit)) - step_exp);
    std::snprintf(b, sizeof b, "%.*f", std::min(d, 3), v / unit);
    return strip_zeros(b) + (unit == 1e6 ? "M" : "k");
  }
  if (a.step < 1e-3) {  // 2e-6, 1.5e-5
    int e = static_cast<int>(std::floor(std::log10(std::fabs(v)) + 1e-9));
    int d = std::clamp(e - step_exp, 0, 3);
    std::snprintf(b, sizeof b, "%.*f", d, v / std::pow(10.0, e));
    return strip_zeros(b) + "e" + std::to_string(e);
  }
  std::snprintf(b, sizeof b, "%.*f", std::clamp(-step_exp, 0, 6), v);
  return b;
}

const char* kColours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
const char* colour(size_t i) { return kColours[i % (sizeof kColours / sizeof *kColours)]; }

struct XY {
  double x, y;
};

enum class Field { Loss, Lr, Tps, GradNorm };

double field(const TrainPoint& p, Field f) {
  switch (f) {
    case Field::Loss: return p.loss;
    case Field::Lr: return p.lr;
    case Field::Tps: return p.tps;
    case Field::GradNorm: return p.grad_norm;
  }
  return kNaN;
}

std::vector<XY> finite_points(const RunSeries& r, Field f) {
  std::vector<XY> v;
  for (auto& p : r.train) {
    double y = field(p, f);
    if (std::isfinite(p.step) && std::isfinite(y)) v.push_back({p.step, y});
  }
  return v;
}
std::vector<XY> finite_val(const RunSeries& r) {
  std::vector<XY> v;
  for (auto& p : r.val)
    if (std::isfinite(p.step) && std::isfinite(p.val_loss)) v.push_back({p.step, p.val_loss});
  return v;
}

struct Box {
  double x0, y0, x1, y1;  // plot area in pixels
};

std::string polyline(const std::vector<XY>& pts, const Axis& ax, const Axis& ay, const Box& b, const char* stroke,
                     const std::string& extra) {
  std::string s = "<polyline fill=\"none\" stroke=\"" + std::string(stroke) +
                  "\" stroke-width=\"1.5\" stroke-linejoin=\"round\"" + extra + " points=\"";
  std::string last;
  for (auto& p : pts) {
    double px = b.x0 + (p.x - ax.lo) / (ax.hi - ax.lo) * (b.x1 - b.x0);
    double py = b.y1 - (p.y - ay.lo) / (ay.hi - ay.lo) * (b.y1 - b.y0);
    std::string c = f1(px) + "," + f1(py);
    if (c == last) continue;  // thousands of steps: drop exact pixel repeats
    if (!last.empty()) s += ' ';
    s += c;
    last = std::move(c);
  }
  return s + "\"/>\n";
}

std::string markers(const std::vector<XY>& pts, const Axis& ax, const Axis& ay, const Box& b, const char* stroke,
                    double r, bool hollow) {
  std::string s;
  for (auto& p : pts) {
    double px = b.x0 + (p.x - ax.lo) / (ax.hi - ax.lo) * (b.x1 - b.x0);
    double py = b.y1 - (p.y - ay.lo) / (ay.hi - ay.lo) * (b.y1 - b.y0);
    s += "<circle cx=\"" + f1(px) + "\" cy=\"" + f1(py) + "\" r=\"" + f1(r) + "\" fill=\"" +
         (hollow ? std::string("white") : std::string(stroke)) + "\" stroke=\"" + stroke + "\" stroke-width=\"1.2\"/>\n";
  }
  return s;
}

struct PanelSpec {
  const char* title;
  const char* ylabel;
  Field field;
};

std::string panel(const std::vector<RunSeries>& runs, const PanelSpec& spec, double px, double py, double pw,
                  double ph) {
  const Box b{px + 72, py + 30, px + pw - 20, py + ph - 42};
  std::vector<std::vector<XY>> series(runs.size()), vals(runs.size());
  double xmn = INFINITY, xmx = -INFINITY, ymn = INFINITY, ymx = -INFINITY;
  bool any_val = false;
  for (size_t i = 0; i < runs.size(); ++i) {
    series[i] = finite_points(runs[i], spec.field);
    if (spec.field == Field::Loss) vals[i] = finite_val(runs[i]);
    any_val |= !vals[i].empty();
    for (auto* v : {&series[i], &vals[i]})
      for (auto& p : *v) xmn = std::min(xmn, p.x), xmx = std::max(xmx, p.x), ymn = std::min(ymn, p.y), ymx = std::max(ymx, p.y);
  }
  const bool empty = !(xmn <= xmx);
  Axis ax = empty ? nice_axis(0, 1, true) : nice_axis(xmn, xmx, true);
  if (!empty && ymx > ymn) {  // a little headroom so extreme points do not sit on the frame
    double pad = 0.02 * (ymx - ymn);
    ymn = ymn >= 0 ? std::max(0.0, ymn - pad) : ymn - pad;
    ymx += pad;
  }
  Axis ay = empty ? nice_axis(0, 1, false) : nice_axis(ymn, ymx, false);

  std::ostringstream o;
  o << "<g>\n";
  o << "<text x=\"" << f1((b.x0 + b.x1) / 2) << "\" y=\"" << f1(py + 18)
    << "\" text-anchor=\"middle\" font-size=\"13\" font-weight=\"bold\">" << spec.title << "</text>\n";
  if (any_val) {  // key for the loss panel's two series kinds
    double kx = b.x1 - 118, ky = py + 18;
    o << "<line x1=\"" << f1(kx) << "\" y1=\"" << f1(ky - 4) << "\" x2=\"" << f1(kx + 16) << "\" y2=\"" << f1(ky - 4)
      << "\" stroke=\"#444\" stroke-width=\"1.5\"/>\n"
      << "<text x=\"" << f1(kx + 20) << "\" y=\"" << f1(ky) << "\" font-size=\"10\">train</text>\n"
      << "<circle cx=\"" << f1(kx + 62) << "\" cy=\"" << f1(ky - 4) << "\" r=\"3\" fill=\"white\" stroke=\"#444\"/>\n"
      << "<text x=\"" << f1(kx + 70) << "\" y=\"" << f1(ky) << "\" font-size=\"10\">val_loss</text>\n";
  }
  o << "<rect x=\"" << f1(b.x0) << "\" y=\"" << f1(b.y0) << "\" width=\"" << f1(b.x1 - b.x0) << "\" height=\""
    << f1(b.y1 - b.y0) << "\" fill=\"none\" stroke=\"#888\" stroke-width=\"1\"/>\n";
  // Ticks, grid lines and labels. Tick values are lo + k*step (no accumulated error).
  int nx = static_cast<int>(std::lround((ax.hi - ax.lo) / ax.step));
  int ny = static_cast<int>(std::lround((ay.hi - ay.lo) / ay.step));
  for (int k = 0; k <= nx && k <= 50; ++k) {
    double v = ax.lo + k * ax.step;
    double x = b.x0 + (v - ax.lo) / (ax.hi - ax.lo) * (b.x1 - b.x0);
    if (k > 0 && k < nx)
      o << "<line x1=\"" << f1(x) << "\" y1=\"" << f1(b.y0) << "\" x2=\"" << f1(x) << "\" y2=\"" << f1(b.y1)
        << "\" stroke=\"#e6e6e6\" stroke-width=\"1\"/>\n";
    o << "<line x1=\"" << f1(x) << "\" y1=\"" << f1(b.y1) << "\" x2=\"" << f1(x) << "\" y2=\"" << f1(b.y1 + 4)
      << "\" stroke=\"#888\"/>\n";
    o << "<text x=\"" << f1(x) << "\" y=\"" << f1(b.y1 + 15) << "\" text-anchor=\"middle\" font-size=\"10\">"
      << fmt_tick(v, ax) << "</text>\n";
  }
  for (int k = 0; k <= ny && k <= 50; ++k) {
    double v = ay.lo + k * ay.step;
    double y = b.y1 - (v - ay.lo) / (ay.hi - ay.lo) * (b.y1 - b.y0);
    if (k > 0 && k < ny)
      o << "<line x1=\"" << f1(b.x0) << "\" y1=\"" << f1(y) << "\" x2=\"" << f1(b.x1) << "\" y2=\"" << f1(y)
        << "\" stroke=\"#e6e6e6\" stroke-width=\"1\"/>\n";
    o << "<line x1=\"" << f1(b.x0 - 4) << "\" y1=\"" << f1(y) << "\" x2=\"" << f1(b.x0) << "\" y2=\"" << f1(y)
      << "\" stroke=\"#888\"/>\n";
    o << "<text x=\"" << f1(b.x0 - 7) << "\" y=\"" << f1(y + 3.5) << "\" text-anchor=\"end\" font-size=\"10\">"
      << fmt_tick(v, ay) << "</text>\n";
  }
  o << "<text x=\"" << f1((b.x0 + b.x1) / 2) << "\" y=\"" << f1(b.y1 + 32)
    << "\" text-anchor=\"middle\" font-size=\"11\">step</text>\n";
  double lx = px + 16, ly = (b.y0 + b.y1) / 2;
  o << "<text x=\"" << f1(lx) << "\" y=\"" << f1(ly) << "\" text-anchor=\"middle\" font-size=\"11\" transform=\"rotate(-90 "
    << f1(lx) << " " << f1(ly) << ")\">" << spec.ylabel << "</text>\n";
  if (empty)
    o << "<text x=\"" << f1((b.x0 + b.x1) / 2) << "\" y=\"" << f1((b.y0 + b.y1) / 2)
      << "\" text-anchor=\"middle\" font-size=\"11\" fill=\"#888\">no data</text>\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const std::string cls = " class=\"series run" + std::to_string(i) + "\"";
    if (!series[i].empty()) o << polyline(series[i], ax, ay, b, colour(i), cls);
    if (series[i].size() == 1) o << markers(series[i], ax, ay, b, colour(i), 2.5, false);
    if (!vals[i].empty()) {
      o << polyline(vals[i], ax, ay, b, colour(i), " class=\"val run" + std::to_string(i) +
                                                       "\" stroke-dasharray=\"4 3\" stroke-opacity=\"0.7\"");
      o << markers(vals[i], ax, ay, b, colour(i), 3.0, true);
    }
  }
  o << "</g>\n";
  return o.str();
}

}  // namespace

std::string run_label(const std::string& dir) {
  fs::path p = fs::path(dir).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();
  std::string l = p.filename().string();
  if (l.empty() || l == "." || l == "..") l = fs::absolute(p).lexically_normal().filename().string();
  return l.empty() ? dir : l;
}

RunSeries read_run(const std::string& dir, const std::string& label) {
  RunSeries r;
  r.label = label.empty() ? run_label(dir) : label;
  const std::string tpath = (fs::path(dir) / "training.jsonl").string();
  std::ifstream tin(tpath);
  if (!tin) throw IoError("plot: cannot read " + tpath + ": " + std::strerror(errno));
  r.skipped_lines += for_each_object(tin, [&](const json& j) {
    r.train.push_back({num(j, "step"), num(j, "loss"), num(j, "grad_norm"), num(j, "lr"), num(j, "tps"), num(j, "mem_gib")});
  });
  std::ifstream vin((fs::path(dir) / "validation.jsonl").string());
  if (vin) r.skipped_lines += for_each_object(vin, [&](const json& j) { r.val.push_back({num(j, "step"), num(j, "val_loss")}); });
  std::stable_sort(r.train.begin(), r.train.end(), [](auto& a, auto& b) { return a.step < b.step; });
  std::stable_sort(r.val.begin(), r.val.end(), [](auto& a, auto& b) { return a.step < b.step; });
  return r;
}

std::string render_training_svg(const std::vector<RunSeries>& runs, const std::string& title) {
  const double W = 900, H = 600;
  std::ostringstream o;
  // Legend layout first: it decides where the panels start.
  struct Item {
    double x;
    int row;
  };
  std::vector<Item> items;
  double x = 60;
  int row = 0;
  for (auto& r : runs) {
    double w = 26 + 6.5 * static_cast<double>(std::min<size_t>(r.label.size(), 60)) + 18;
    if (x + w > W - 20 && x > 60) x = 60, ++row;
    items.push_back({x, row});
    x += w;
  }
  const double legend_y = 48, top = legend_y + 14 + 16.0 * row;
  o << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    << "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"900\" height=\"600\" viewBox=\"0 0 900 600\""
       " font-family=\"sans-serif\">\n"
    << "<rect x=\"0\" y=\"0\" width=\"900\" height=\"600\" fill=\"white\"/>\n"
    << "<text x=\"450\" y=\"26\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">" << xml_escape(title)
    << "</text>\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    double y = legend_y + 16.0 * items[i].row;
    std::string label = runs[i].label.size() > 60 ? runs[i].label.substr(0, 57) + "..." : runs[i].label;
    o << "<line x1=\"" << f1(items[i].x) << "\" y1=\"" << f1(y - 4) << "\" x2=\"" << f1(items[i].x + 20) << "\" y2=\""
      << f1(y - 4) << "\" stroke=\"" << colour(i) << "\" stroke-width=\"3\"/>\n"
      << "<text class=\"legend\" x=\"" << f1(items[i].x + 26) << "\" y=\"" << f1(y) << "\" font-size=\"12\">"
      << xml_escape(label) << "</text>\n";
  }
  static const PanelSpec specs[4] = {{"Loss", "loss", Field::Loss},
                                     {"Learning rate", "learning rate", Field::Lr},
                                     {"Throughput", "tokens/s", Field::Tps},
                                     {"Gradient norm", "grad norm", Field::GradNorm}};
  const double pw = W / 2, ph = (H - top) / 2;
  for (int k = 0; k < 4; ++k) o << panel(runs, specs[k], (k % 2) * pw, top + (k / 2) * ph, pw, ph);
  o << "</svg>\n";
  return o.str();
}

void write_training_svg(const std::string& path, const std::vector<RunSeries>& runs, const std::string& title) {
  const std::string svg = render_training_svg(runs, title);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw IoError("plot: cannot write " + tmp + ": " + std::strerror(errno));
    out.write(svg.data(), static_cast<std::streamsize>(svg.size()));
    out.flush();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      throw IoError("plot: write failed for " + tmp);
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    std::error_code ec2;
    fs::remove(tmp, ec2);
    throw IoError("plot: cannot rename " + tmp + " to " + path + ": " + ec.message());
  }
}

std::string plot_run_dir(const std::string& dir, const std::string& title) {
  RunSeries r = read_run(dir);
  const std::string path = (fs::path(dir) / "training.svg").string();
  write_training_svg(path, {r}, title.empty() ? r.label : title);
  return path;
}

}  // namespace am::io
