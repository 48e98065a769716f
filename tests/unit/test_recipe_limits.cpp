// Hostile recipes and JSON files (issue 13): self-referencing YAML aliases, alias bombs, scalars of tens of
// thousands of digits, numbers out of range, nan/inf where they make no sense, recipe paths that are not
// regular files, JSON nested 100k deep in every file the engine parses. Every case is generated here and
// must end in the typed error that names the file / key / line, quickly (CI is a slow 2-core box), never
// a crash or a hang.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/dataset.h"
#include "data/text_common.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "train/lr_scheduler.h"
#include "train/optimizer.h"
#include "config/recipe.h"

using namespace am;
namespace fs = std::filesystem;

namespace {

constexpr double kMaxSeconds = 3.0;

fs::path tmp_dir() {
  static fs::path d = [] {
    fs::path p = fs::temp_directory_path() / ("am_recipe_limits_" + std::to_string(::getpid()));
    fs::create_directories(p);
    return p;
  }();
  return d;
}

std::string write_file(const std::string& name, const std::string& text) {
  fs::path p = tmp_dir() / name;
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}

// Runs fn, which must throw exactly ErrT (not a subclass of something else, not another am::Error), within
// kMaxSeconds; returns the message. Failures name `what`.
template <class ErrT>
std::string expect_error(const std::string& what, const std::function<void()>& fn) {
  auto t0 = std::chrono::steady_clock::now();
  std::string msg;
  try {
    fn();
    ADD_FAILURE() << what << ": no error";
  } catch (const ErrT& e) {
    msg = e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": wrong error type: " << e.what();
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(s, kMaxSeconds) << what << " took " << s << " s";
  return msg;
}

std::string recipe_error(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  return expect_error<RecipeError>(yaml.substr(0, 80), [&] { Recipe::from_string(yaml, "r.yaml", overrides); });
}

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << "message: " << (msg)

std::string deep_json(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

}  // namespace

// ---- YAML aliases ---------------------------------------------------------------------------------------

TEST(RecipeLimits, SelfReferencingAliasIsARecipeErrorNamingTheKey) {
  std::string e = recipe_error("a: &a [*a]\n");
  EXPECT_HAS(e, "r.yaml:1: key 'a.0'");
  EXPECT_HAS(e, "cyclic YAML alias");
  // A cycle through a mapping, deeper in the file.
  e = recipe_error("seed: 1\nci:\n  cfg: &b\n    x: [1, {y: *b}]\n");
  EXPECT_HAS(e, "r.yaml:");
  EXPECT_HAS(e, "key 'ci.cfg.x.1.y'");
  EXPECT_HAS(e, "cyclic");
  // The whole document refers to itself.
  e = recipe_error("&r {seed: 1, model: *r}\n");
  EXPECT_HAS(e, "key 'model'");
}

TEST(RecipeLimits, SelfReferencingAliasInAnOverride) {
  std::string e = recipe_error("seed: 1\n", {"a.b=&x [*x]"});
  EXPECT_HAS(e, "command-line override --a.b");
  EXPECT_HAS(e, "cyclic");
  e = recipe_error("seed: 1\n", {"ci.cfg=&m {k: *m}"});
  EXPECT_HAS(e, "command-line override --ci.cfg");
  EXPECT_HAS(e, "ci.cfg.k");
}

TEST(RecipeLimits, SharedAliasesThatAreNotCyclesStillWork) {
  Recipe r = Recipe::from_string(
      "peft:\n  target_modules: &t [q_proj, v_proj]\n  exclude_modules: *t\n"
      "ci:\n  cfg: {a: &n {x: 1, y: [2, 3]}, b: *n, c: *n}\n");
  EXPECT_EQ(r.node("peft.exclude_modules"), r.node("peft.target_modules"));
  EXPECT_EQ(r.node("ci.cfg.c.y").size(), 2u);
}

TEST(RecipeLimits, AliasBombsAreCappedQuickly) {
  // The billion-laughs pattern: level i is a list of 10 aliases of level i-1 (10^9 values expanded).
  for (int fan : {10, 3}) {
    for (int levels : {7, 9, 20}) {
      std::string y = "l0: &l0 [lol]\n";
      for (int i = 1; i < levels; ++i) {
        y += "l" + std::to_string(i) + ": &l" + std::to_string(i) + " [";
        for (int k = 0; k < fan; ++k) y += (k ? ", *l" : "*l") + std::to_string(i - 1);
        y += "]\n";
      }
      if (std::pow(fan, levels) < 2e5) continue;  // small enough to expand: not a bomb
      std::string e = recipe_error(y);
      EXPECT_HAS(e, "r.yaml:");
      EXPECT_HAS(e, "key 'l");
      EXPECT_HAS(e, "alias bomb");
    }
  }
  // The same as an override value: {k0: &k0 [x, ...], k1: &k1 [*k0, ...], ...} in one flow mapping.
  std::string flow = "{k0: &k0 [x,x,x,x,x,x,x,x]";
  for (int i = 1; i < 8; ++i) {
    const std::string prev = "*k" + std::to_string(i - 1);
    flow += ", k" + std::to_string(i) + ": &k" + std::to_string(i) + " [";
    for (int k = 0; k < 8; ++k) flow += (k ? "," : "") + prev;
    flow += "]";
  }
  flow += "}";
  std::string e = recipe_error("seed: 1\n", {"ci.cfg=" + flow});
  EXPECT_HAS(e, "command-line override --ci.cfg");
  EXPECT_HAS(e, "alias bomb");
}

// ---- scalars ----------------------------------------------------------------------------------------------

TEST(RecipeLimits, LongDigitStringsNeverCrash) {
  for (size_t n : {19u, 20u, 21u, 64u, 400u, 5000u, 50000u, 200000u}) {
    const std::string digits(n, '9');
    for (const std::string& v : {digits, "-" + digits, "+" + digits}) {
      std::string e = recipe_error("seed: " + v + "\n");
      EXPECT_HAS(e, "r.yaml:1: key 'seed'");
      EXPECT_HAS(e, "out of range for an integer");
      EXPECT_LT(e.size(), 300u) << "the message quotes the whole scalar";
      e = recipe_error("seed: 1\n", {"seed=" + v});
      EXPECT_HAS(e, "command-line override --seed");
      EXPECT_HAS(e, "out of range for an integer");
    }
    // Floats of that many digits: refused when over-long, else read.
    const std::string f = "0." + std::string(n, '1');
    if (f.size() > 400) {
      std::string e = recipe_error("optimizer: {lr: " + f + "}\n");
      EXPECT_HAS(e, "key 'optimizer.lr'");
      EXPECT_HAS(e, "too many digits");
    } else {
      Recipe r = Recipe::from_string("optimizer: {lr: " + f + "}\n");
      EXPECT_NEAR(r.get_double("optimizer.lr", 0), 0.1111111111, 1e-9);
    }
  }
  // The issue's 20-digit seed, and the int64 edges.
  EXPECT_HAS(recipe_error("seed: 123456789012345678901\n"), "key 'seed': 123456789012345678901 is out of range for an integer");
  EXPECT_HAS(recipe_error("seed: 9223372036854775808\n"), "out of range");
  EXPECT_HAS(recipe_error("seed: -9223372036854775809\n"), "out of range");
  EXPECT_EQ(Recipe::from_string("seed: 9223372036854775807\n").get_int("seed", 0), INT64_MAX);
  EXPECT_EQ(Recipe::from_string("seed: -9223372036854775808\n").get_int("seed", 0), INT64_MIN);
  EXPECT_EQ(Recipe::from_string("seed: 0x2A\n").get_int("seed", 0), 42);
  EXPECT_EQ(Recipe::from_string("seed: 0o52\n").get_int("seed", 0), 42);
  EXPECT_HAS(recipe_error("seed: 0x1FFFFFFFFFFFFFFFF\n"), "out of range");
  // Floats beyond double: out of range; below the smallest subnormal: 0, as YAML parsers read it.
  EXPECT_HAS(recipe_error("optimizer: {lr: 1e999}\n"), "key 'optimizer.lr': 1e999 is out of range for a number");
  EXPECT_HAS(recipe_error("seed: 1\n", {"optimizer.lr=-1e400"}), "override --optimizer.lr");
  EXPECT_EQ(Recipe::from_string("optimizer: {lr: 1e-999}\n").get_double("optimizer.lr", 1), 0.0);
  // An integer key given a float out of int64's range, or inf.
  EXPECT_HAS(recipe_error("step_scheduler: {num_epochs: 1e30}\n"), "key 'step_scheduler.num_epochs': 1e+30 is out of range for an integer");
  EXPECT_HAS(recipe_error("step_scheduler: {num_epochs: .inf}\n"), "expected an integer, got .inf");
}

TEST(RecipeLimits, RandomNumericLookingScalarsNeverCrash) {
  // Fuzz: strings over the alphabet of numbers, of random length; each loads or is a RecipeError.
  std::mt19937_64 rng(1234);
  const std::string alphabet = "0123456789.eE+-_xo";
  auto t0 = std::chrono::steady_clock::now();
  int loaded = 0, refused = 0;
  for (int it = 0; it < 1500; ++it) {
    const size_t len = 1 + rng() % (it % 50 == 0 ? 20000 : 40);
    std::string s;
    for (size_t i = 0; i < len; ++i) s += alphabet[rng() % alphabet.size()];
    if (s[0] == '-' && s.size() > 1 && s[1] == ' ') continue;
    try {
      Recipe r = Recipe::from_string("ci: {cfg: {v: " + s + "}}\n");
      (void)r.get_string("ci.cfg.v", "");
      ++loaded;
    } catch (const RecipeError& e) {
      ++refused;
      EXPECT_LT(std::string(e.what()).size(), 400u) << e.what();
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(secs, 2 * kMaxSeconds);
  EXPECT_GT(loaded, 0);
}

TEST(RecipeLimits, NanAndInfAreFloats) {
  Recipe r = Recipe::from_string(
      "ci:\n  cfg: {a: .nan, b: .NaN, c: .NAN, d: .inf, e: .Inf, f: +.INF, g: -.inf, h: -.Inf, i: '.nan', "
      "j: 1e3, k: .5, l: 1., m: 1.2.3, n: 0x, o: ~}\n");
  for (const char* k : {"a", "b", "c"}) {
    const auto& v = r.node(std::string("ci.cfg.") + k);
    EXPECT_TRUE(v.is_number_float() && std::isnan(v.get<double>())) << k;
  }
  for (const char* k : {"d", "e", "f"}) EXPECT_EQ(r.get_double(std::string("ci.cfg.") + k, 0), INFINITY) << k;
  for (const char* k : {"g", "h"}) EXPECT_EQ(r.get_double(std::string("ci.cfg.") + k, 0), -INFINITY) << k;
  EXPECT_TRUE(r.node("ci.cfg.i").is_string());  // quoted: a string
  EXPECT_EQ(r.get_double("ci.cfg.j", 0), 1000.0);
  EXPECT_EQ(r.get_double("ci.cfg.k", 0), 0.5);
  EXPECT_EQ(r.get_double("ci.cfg.l", 0), 1.0);
  EXPECT_TRUE(r.node("ci.cfg.m").is_string());
  EXPECT_TRUE(r.node("ci.cfg.n").is_string());
  EXPECT_TRUE(r.node("ci.cfg.o").is_null());
  EXPECT_EQ(r.get_string("ci.cfg.a", ""), ".nan");
  // clip_grad_norm.max_norm: .inf means "never clip" and is accepted; .nan is not.
  EXPECT_EQ(Recipe::from_string("clip_grad_norm: {max_norm: .inf}\n").get_double("clip_grad_norm.max_norm", 0), INFINITY);
  EXPECT_HAS(recipe_error("clip_grad_norm: {max_norm: .nan}\n"), "key 'clip_grad_norm.max_norm'");
}

// ---- values that make no sense --------------------------------------------------------------------------

TEST(RecipeLimits, NonsenseValuesAreRefusedNamingTheKey) {
  struct Case {
    std::string override_, key, why;
  };
  const std::vector<Case> cases = {
      {"optimizer.lr=.inf", "optimizer.lr", "finite"},
      {"optimizer.lr=-.inf", "optimizer.lr", "finite"},
      {"optimizer.lr=.nan", "optimizer.lr", "finite"},
      {"optimizer.lr=-1e-3", "optimizer.lr", ">= 0"},
      {"optimizer.eps=0", "optimizer.eps", "> 0"},
      {"optimizer.eps=-1", "optimizer.eps", "> 0"},
      {"optimizer.eps=.nan", "optimizer.eps", "finite"},
      {"optimizer.weight_decay=-0.1", "optimizer.weight_decay", ">= 0"},
      {"optimizer.weight_decay=.inf", "optimizer.weight_decay", "finite"},
      {"optimizer.momentum=-1", "optimizer.momentum", ">= 0"},
      {"lr_scheduler.lr_warmup_steps=-1", "lr_scheduler.lr_warmup_steps", ">= 0"},
      {"lr_scheduler.lr_decay_steps=-5", "lr_scheduler.lr_decay_steps", ">= 1"},
      {"lr_scheduler.min_lr=-1e-6", "lr_scheduler.min_lr", ">= 0"},
      {"lr_scheduler.max_lr=.nan", "lr_scheduler.max_lr", "finite"},
      {"lr_scheduler.init_lr=.inf", "lr_scheduler.init_lr", "finite"},
      {"lr_scheduler.wd_incr_steps=-1", "lr_scheduler.wd_incr_steps", ">= 0"},
      {"step_scheduler.num_epochs=-1", "step_scheduler.num_epochs", ">= 0"},
      {"step_scheduler.ckpt_every_steps=-10", "step_scheduler.ckpt_every_steps", ">= 0"},
      {"step_scheduler.val_every_steps=-1", "step_scheduler.val_every_steps", ">= 0"},
      {"packed_sequence.packed_sequence_size=-1", "packed_sequence.packed_sequence_size", ">= 0"},
      {"clip_grad_norm.max_norm=0", "clip_grad_norm.max_norm", "> 0"},
      {"clip_grad_norm.max_norm=-1", "clip_grad_norm.max_norm", "> 0"},
  };
  for (const auto& c : cases) {
    std::string e = recipe_error("seed: 1\n", {c.override_});
    EXPECT_HAS(e, "command-line override --" + c.key);
    EXPECT_HAS(e, c.why);
    // The same value in the file names file, line and key.
    const auto eq = c.override_.find('=');
    const std::string key = c.override_.substr(0, eq), val = c.override_.substr(eq + 1);
    const auto dot = key.find('.');
    e = recipe_error("seed: 1\n" + key.substr(0, dot) + ":\n  " + key.substr(dot + 1) + ": " + val + "\n");
    EXPECT_HAS(e, "r.yaml:3: key '" + c.key + "'");
  }
  // num_epochs 0 still means "max_steps alone".
  EXPECT_EQ(Recipe::from_string("step_scheduler: {num_epochs: 0, max_steps: 5}\n").get_int("step_scheduler.num_epochs", 1), 0);
  // Betas (checked by the optimizer): NaN is outside [0, 1) too.
  for (const char* b : {"[.nan, 0.9]", "[0.9, .inf]", "[1.0, 0.9]", "[-0.1, 0.9]"}) {
    Recipe r = Recipe::from_string("optimizer: {betas: " + std::string(b) + "}\n");
    std::string e = expect_error<RecipeError>(b, [&] { OptimizerConfig::from_recipe(r); });
    EXPECT_HAS(e, "key 'optimizer.betas'");
  }
  // An unknown weight-decay style is named rather than run as cosine.
  Recipe r = Recipe::from_string("lr_scheduler: {wd_incr_style: sideways}\n");
  EXPECT_HAS(expect_error<RecipeError>("wd style", [&] { LrScheduler::from_recipe(r, 1e-3, 0.0, 100); }),
             "lr_scheduler.wd_incr_style");
}

// ---- recipe files ---------------------------------------------------------------------------------------

TEST(RecipeLimits, RecipePathsThatAreNotRegularFiles) {
  std::string e = expect_error<RecipeError>("/dev/zero", [] { Recipe::load("/dev/zero"); });
  EXPECT_HAS(e, "/dev/zero");
  EXPECT_HAS(e, "not a regular file");
  e = expect_error<RecipeError>("dir", [] { Recipe::load(tmp_dir().string()); });
  EXPECT_HAS(e, tmp_dir().string());
  EXPECT_HAS(e, "directory");
  // A FIFO nobody writes to: refused without opening it (opening would block).
  const std::string fifo = (tmp_dir() / "recipe.fifo").string();
  ::unlink(fifo.c_str());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  e = expect_error<RecipeError>("fifo", [&] { Recipe::load(fifo); });
  EXPECT_HAS(e, fifo);
  // Over 4 MiB.
  const std::string big = write_file("big.yaml", "seed: 1\n" + std::string(5u << 20, '#'));
  e = expect_error<RecipeError>("big", [&] { Recipe::load(big); });
  EXPECT_HAS(e, big);
  EXPECT_HAS(e, "4 MiB");
  e = expect_error<RecipeError>("missing", [] { Recipe::load("/nonexistent/r.yaml"); });
  EXPECT_HAS(e, "recipe file not found: /nonexistent/r.yaml");
}

TEST(RecipeLimits, DeeplyNestedYaml) {
  for (size_t depth : {100u, 5000u, 100000u}) {
    std::string e = recipe_error("model: {backend: {x: " + deep_json(depth) + "}}\n");
    EXPECT_HAS(e, "r.yaml:1");
    EXPECT_TRUE(e.find("nested") != std::string::npos) << e;
  }
  std::string e = recipe_error("seed: 1\n", {"ci.cfg.x=" + deep_json(100000)});
  EXPECT_HAS(e, "override --ci.cfg.x");
}

// ---- deep JSON in every file the engine parses -----------------------------------------------------------

TEST(RecipeLimits, DeepJsonConfigIsAFormatErrorNamingTheFile) {
  for (size_t depth : {300u, 100000u}) {
    const std::string dir = (tmp_dir() / ("deepcfg" + std::to_string(depth))).string();
    write_file("deepcfg" + std::to_string(depth) + "/config.json",
               R"({"model_type": "llama", "rope_scaling": )" + deep_json(depth) + "}");
    std::string e = expect_error<FormatError>("config", [&] { io::load_model_config(dir); });
    EXPECT_HAS(e, dir + "/config.json");
    EXPECT_HAS(e, "nested deeper");
  }
  // A syntax error keeps its wording.
  const std::string bad = write_file("badcfg/config.json", "{\"model_type\": ");
  EXPECT_HAS(expect_error<FormatError>("bad config", [&] { io::load_model_config(bad); }), "not valid JSON");
}

TEST(RecipeLimits, DeepJsonTokenizerFiles) {
  const std::string d = (tmp_dir() / "deeptok").string();
  write_file("deeptok/tokenizer.json", R"({"model": )" + deep_json(100000) + "}");
  std::string e = expect_error<FormatError>("tokenizer.json", [&] { tok::Tokenizer::from_dir(d); });
  EXPECT_HAS(e, "tokenizer.json");
  EXPECT_HAS(e, "nested deeper");
  write_file("deeptok/tokenizer_config.json", R"({"chat_template": )" + deep_json(100000) + "}");
  e = expect_error<FormatError>("tokenizer_config.json", [&] { tok::Tokenizer::from_dir(d); });
  EXPECT_HAS(e, "tokenizer_config.json");
  e = expect_error<FormatError>("special tokens", [&] { tok::special_tokens_of(d); });
  EXPECT_HAS(e, "tokenizer_config.json");
  EXPECT_HAS(e, "nested deeper");
}

TEST(RecipeLimits, DeepJsonSafetensorsHeader) {
  const std::string header = R"({"__metadata__": )" + deep_json(100000) + "}";
  std::string bytes(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  const std::string p = write_file("deep.safetensors", bytes + header);
  std::string e = expect_error<FormatError>("safetensors", [&] { io::SafeTensors::open(p); });
  EXPECT_HAS(e, p);
  EXPECT_HAS(e, "nested deeper");
  const std::string idx = write_file("deepidx/model.safetensors.index.json", R"({"weight_map": )" + deep_json(100000) + "}");
  e = expect_error<FormatError>("index", [&] { io::SafeTensors::open(idx); });
  EXPECT_HAS(e, idx);
}

TEST(RecipeLimits, DeepJsonDatasetLinesNameFileAndLine) {
  const std::string p = write_file("deep.jsonl", "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": " + deep_json(100000) + "}\n");
  Recipe r = Recipe::from_string("dataset: {_target_: tokenized_jsonl, path_or_dataset: " + p + "}\n");
  DatasetContext ctx;
  ctx.vocab_size = 100;
  std::string e = expect_error<Error>("tokenized_jsonl", [&] { make_dataset(r, "dataset", ctx); });
  EXPECT_HAS(e, p + ":2: malformed JSON line");
  EXPECT_HAS(e, "nested deeper");
  // The row reader of the text datasets: JSONL lines, one JSON list, and a whole-file document.
  JsonRow row;
  e = expect_error<Error>("rows", [&] {
    JsonRowReader rd(p, 0);
    while (rd.next(row)) {
    }
  });
  EXPECT_HAS(e, p + ":2");
  const std::string list = write_file("deeplist.json", "[" + deep_json(100000) + "]");
  e = expect_error<DataError>("list", [&] { JsonRowReader rd(list, 0); });
  EXPECT_HAS(e, list);
  EXPECT_HAS(e, "nested deeper");
  const std::string doc = write_file("deepdoc.json", "{\"data\": " + deep_json(100000) + "}");
  e = expect_error<DataError>("doc", [&] { parse_json_file(doc); });
  EXPECT_HAS(e, doc);
  // A plain syntax error in a whole-file document is still "not JSON" (nullopt), not an error.
  EXPECT_FALSE(parse_json_file(write_file("notjson.json", "{\"data\": [1,")).has_value());
}
