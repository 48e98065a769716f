// io/svg_plot.h: reading a run directory (bad lines skipped, validation.jsonl optional, missing training.jsonl
// is an IoError) and the SVG figure (4 panels, one polyline per run per panel, legend, no NaN for odd data).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include "core/error.h"
#include "io/svg_plot.h"

using namespace am;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() / ("am_svg_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

void spit(const fs::path& p, const std::string& s) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary | std::ios::trunc) << s;
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t pos = s.find(what); pos != std::string::npos; pos = s.find(what, pos + 1)) ++n;
  return n;
}

void expect_no_nan(const std::string& svg) {
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  EXPECT_EQ(svg.find("NaN"), std::string::npos);
  EXPECT_EQ(svg.find("inf"), std::string::npos);
}

}  // namespace

TEST(SvgPlot, ReadsRunSkippingBadLines) {
  TempDir t;
  fs::path d = t.path / "run_a";
  spit(d / "training.jsonl",
       "{\"step\":2,\"epoch\":0,\"loss\":2.0,\"grad_norm\":1.5,\"lr\":1e-4,\"tps\":1000,\"mem_gib\":3.0}\n"
       "{\"step\":1,\"loss\":2.5,\"grad_norm\":2.0,\"lr\":5e-5,\"tps\":900,\"mem_gib\":3.0,\"mfu\":0.1}\n"
       "not json at all\n"
       "\n"
       "{\"step\":3,\"loss\":null,\"grad_norm\":1.0,\"lr\":1e-4,\"tps\":1100,\"mem_gib\":3.1}\n"
       "{\"step\":4,\"loss\":1.8,\"gra");  // mid-write
  io::RunSeries r = io::read_run(d.string());
  EXPECT_EQ(r.label, "run_a");
  ASSERT_EQ(r.train.size(), 3u);
  EXPECT_EQ(r.skipped_lines, 2u);
  EXPECT_EQ(r.train[0].step, 1);  // sorted by step
  EXPECT_DOUBLE_EQ(r.train[0].loss, 2.5);
  EXPECT_DOUBLE_EQ(r.train[1].lr, 1e-4);
  EXPECT_TRUE(std::isnan(r.train[2].loss));  // null -> NaN
  EXPECT_TRUE(r.val.empty());                 // no validation.jsonl

  spit(d / "validation.jsonl", "{\"step\":2,\"val_loss\":2.2,\"num_label_tokens\":10}\n{bad\n");
  r = io::read_run(d.string() + "/", "mine");
  EXPECT_EQ(r.label, "mine");
  ASSERT_EQ(r.val.size(), 1u);
  EXPECT_DOUBLE_EQ(r.val[0].val_loss, 2.2);
  EXPECT_EQ(io::run_label(d.string() + "/"), "run_a");
}

TEST(SvgPlot, MissingTrainingJsonlIsIoErrorNamingPath) {
  TempDir t;
  const std::string d = (t.path / "nothing_here").string();
  try {
    io::read_run(d);
    FAIL() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(d + "/training.jsonl"), std::string::npos) << e.what();
  }
}

TEST(SvgPlot, RendersPanelsPolylinesAndLegend) {
  std::vector<io::RunSeries> runs(2);
  runs[0].label = "lr_1e-4";
  runs[1].label = "lr<3e-4>&";
  for (int s = 1; s <= 3000; ++s) {
    runs[0].train.push_back({double(s), 3.0 / s + 1, 1.0 + 0.1 * (s % 7), 1e-4 * s / 3000, 15000.0 + s % 50, 3});
    runs[1].train.push_back({double(s), 2.5 / s + 1, 0.8, 3e-4, 12000.0, 3});
  }
  runs[0].val = {{1000, 1.5}, {2000, 1.4}, {3000, 1.3}};
  runs[1].train[10].loss = std::numeric_limits<double>::quiet_NaN();
  runs[1].train[11].tps = std::numeric_limits<double>::infinity();
  const std::string svg = io::render_training_svg(runs, "compare");
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  EXPECT_NE(svg.find("<svg xmlns=\"http://www.w3.org/2000/svg\""), std::string::npos);
  EXPECT_NE(svg.find("font-family=\"sans-serif\""), std::string::npos);
  EXPECT_EQ(svg.substr(svg.size() - 7), "</svg>\n");
  for (const char* title : {">Loss<", ">Learning rate<", ">Throughput<", ">Gradient norm<"})
    EXPECT_NE(svg.find(title), std::string::npos) << title;
  EXPECT_EQ(count(svg, "class=\"series run0\""), 4u);
  EXPECT_EQ(count(svg, "class=\"series run1\""), 4u);
  EXPECT_EQ(count(svg, "class=\"val run0\""), 1u);
  EXPECT_EQ(count(svg, "<polyline"), 9u);
  EXPECT_NE(svg.find(">lr_1e-4</text>"), std::string::npos);
  EXPECT_NE(svg.find(">lr&lt;3e-4&gt;&amp;</text>"), std::string::npos);  // escaped
  EXPECT_NE(svg.find(">val_loss<"), std::string::npos);
  expect_no_nan(svg);
  EXPECT_EQ(count(svg, "<"), count(svg, ">"));  // no stray brackets from labels
}

TEST(SvgPlot, ConstantSingleAndEmptyRunsStayFinite) {
  io::RunSeries one{"one", {{7, 2.0, 1.0, 1e-5, 100, 1}}, {{7, 2.1}}, 0};
  io::RunSeries flat{"flat", {}, {}, 0};
  for (int s = 1; s <= 20; ++s) flat.train.push_back({double(s), 0.0, 0.0, 0.0, 0.0, 0.0});
  io::RunSeries empty{"empty", {}, {}, 0};
  for (auto& runs : {std::vector<io::RunSeries>{one}, std::vector<io::RunSeries>{flat}, std::vector<io::RunSeries>{empty},
                     std::vector<io::RunSeries>{one, flat, empty}}) {
    const std::string svg = io::render_training_svg(runs, "edge");
    expect_no_nan(svg);
    EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  }
  const std::string svg = io::render_training_svg({one}, "one");
  EXPECT_EQ(count(svg, "class=\"series run0\""), 4u);
}

TEST(SvgPlot, WritesAtomicallyAndPlotsRunDir) {
  TempDir t;
  spit(t.path / "r" / "training.jsonl", "{\"step\":1,\"loss\":2,\"grad_norm\":1,\"lr\":0.001,\"tps\":5,\"mem_gib\":1}\n");
  const std::string out = io::plot_run_dir((t.path / "r").string());
  EXPECT_EQ(out, (t.path / "r" / "training.svg").string());
  std::ifstream in(out);
  std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(svg.find(">r</text>"), std::string::npos);
  size_t files = 0;
  for (auto& e : fs::directory_iterator(t.path / "r")) files += e.is_regular_file();
  EXPECT_EQ(files, 2u);  // no tmp file left behind
  EXPECT_THROW(io::write_training_svg((t.path / "no" / "such" / "x.svg").string(), {}, "x"), IoError);
}
