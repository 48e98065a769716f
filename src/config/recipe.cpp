#include "config/recipe.h"

#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string_view>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "core/error.h"
#include "config/schema.h"
#include "core/log.h"

namespace am {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// ---- YAML -> JSON -------------------------------------------------------------------------------------
// Recipes come from users and command lines: the conversion is bounded. A self-referencing alias
// (`a: &a [*a]`) is a cycle, an alias bomb (`&b [*a, *a, ...]` nested) expands exponentially, and a
// scalar may be any length. Each is a RecipeError naming the key, never a crash or a hang.
constexpr size_t kMaxRecipeNodes = 100000;   // nodes after alias expansion
constexpr int kMaxRecipeDepth = 64;          // nesting of sequences and mappings
constexpr uintmax_t kMaxRecipeBytes = 4u << 20;  // a recipe file is at most 4 MiB
constexpr size_t kMaxNumberChars = 400;      // a plain scalar that looks like a number and is longer is refused

// Shows a scalar in a message: long ones are cut, with their length.
std::string show_scalar(const std::string& s) {
  if (s.size() <= 48) return s;
  return s.substr(0, 32) + "... (" + std::to_string(s.size()) + " characters)";
}

bool all_of_class(std::string_view s, bool (*pred)(char)) {
  if (s.empty()) return false;
  for (char c : s)
    if (!pred(c)) return false;
  return true;
}
bool is_dec(char c) { return c >= '0' && c <= '9'; }
bool is_oct(char c) { return c >= '0' && c <= '7'; }
bool is_hex(char c) { return is_dec(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

// YAML 1.2 core schema float: [-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?
bool is_core_float(std::string_view s) {
  size_t i = 0, n = s.size();
  if (i < n && (s[i] == '+' || s[i] == '-')) ++i;
  size_t int_digits = 0, frac_digits = 0;
  while (i < n && is_dec(s[i])) ++i, ++int_digits;
  if (i < n && s[i] == '.') {
    ++i;
    while (i < n && is_dec(s[i])) ++i, ++frac_digits;
  }
  if (int_digits == 0 && frac_digits == 0) return false;
  if (i < n && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < n && (s[i] == '+' || s[i] == '-')) ++i;
    size_t exp_digits = 0;
    while (i < n && is_dec(s[i])) ++i, ++exp_digits;
    if (exp_digits == 0) return false;
  }
  return i == n;
}

// Converts one YAML document (or an override value) to JSON; `where` formats the location of a key.
struct YamlConverter {
  std::string file;        // recipe path, or "" for an override
  std::string override_key;  // the override's key (for an override value)
  std::map<std::string, int>* lines = nullptr;
  size_t nodes = 0;
  std::vector<YAML::Node> path;  // the mappings and sequences being converted (cycle detection)

  std::string where(const std::string& key, const YAML::Mark& m) const {
    if (!override_key.empty()) {
      std::string shown = key.empty() ? override_key : override_key + "." + key;
      return "command-line override --" + override_key + (shown == override_key ? "" : " (key '" + shown + "')");
    }
    std::string loc = file + (m.is_null() ? "" : ":" + std::to_string(m.line + 1));
    return key.empty() ? loc : loc + ": key '" + key + "'";
  }
  [[noreturn]] void fail(const std::string& key, const YAML::Mark& m, const std::string& what) const {
    throw RecipeError(where(key, m) + ": " + what);
  }

  json scalar(const YAML::Node& n, const std::string& key) const {
    const std::string& s = n.Scalar();
    const std::string& tag = n.Tag();
    // Quoted ("!") or explicitly tagged !!str: always a string.
    if (tag == "!" || tag == "tag:yaml.org,2002:str") return s;
    // `none` / `None` too: AutoModel's config loader turns those plain words into Python's None (its recipes
    // write `validation_dataset: none`).
    if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL" || s == "none" || s == "None") return nullptr;
    if (s == "true" || s == "True" || s == "TRUE") return true;
    if (s == "false" || s == "False" || s == "FALSE") return false;
    if (s == ".nan" || s == ".NaN" || s == ".NAN") return std::numeric_limits<double>::quiet_NaN();
    if (s == ".inf" || s == ".Inf" || s == ".INF" || s == "+.inf" || s == "+.Inf" || s == "+.INF")
      return std::numeric_limits<double>::infinity();
    if (s == "-.inf" || s == "-.Inf" || s == "-.INF") return -std::numeric_limits<double>::infinity();
    std::string_view v(s);
    const bool neg = !v.empty() && v[0] == '-';
    std::string_view body = (!v.empty() && (v[0] == '-' || v[0] == '+')) ? v.substr(1) : v;
    // Integers: decimal, 0o octal, 0x hexadecimal (the last two unsigned, as in the core schema).
    int base = 0;
    std::string_view digits;
    if (all_of_class(body, is_dec)) base = 10, digits = body;
    else if (body.size() > 2 && body[0] == '0' && body[1] == 'o' && v[0] != '-' && v[0] != '+' && all_of_class(body.substr(2), is_oct))
      base = 8, digits = body.substr(2);
    else if (body.size() > 2 && body[0] == '0' && body[1] == 'x' && v[0] != '-' && v[0] != '+' && all_of_class(body.substr(2), is_hex))
      base = 16, digits = body.substr(2);
    if (base != 0) {
      uint64_t mag = 0;
      auto r = std::from_chars(digits.data(), digits.data() + digits.size(), mag, base);
      const uint64_t limit = neg ? uint64_t(1) << 63 : uint64_t(INT64_MAX);
      if (r.ec != std::errc() || r.ptr != digits.data() + digits.size() || mag > limit)
        fail(key, n.Mark(), show_scalar(s) + " is out of range for an integer (" + std::to_string(INT64_MIN) + " to " +
                                std::to_string(INT64_MAX) + ")");
      if (neg) return mag == (uint64_t(1) << 63) ? INT64_MIN : -static_cast<int64_t>(mag);
      return static_cast<int64_t>(mag);
    }
    if (is_core_float(v)) {
      if (v.size() > kMaxNumberChars)
        fail(key, n.Mark(), show_scalar(s) + " has too many digits for a number (at most " +
                                std::to_string(kMaxNumberChars) + " characters)");
      errno = 0;
      char* end = nullptr;
      const double d = std::strtod(s.c_str(), &end);
      if (end != s.c_str() + s.size()) fail(key, n.Mark(), show_scalar(s) + " is not a valid number");
      if (errno == ERANGE && std::isinf(d))
        fail(key, n.Mark(), show_scalar(s) + " is out of range for a number (its magnitude must be below 1.8e308)");
      return d;  // an underflow is the nearest representable value (0 or a subnormal), as YAML parsers do
    }
    return s;
  }

  json convert(const YAML::Node& n, const std::string& key) {
    if (++nodes > kMaxRecipeNodes)
      fail(key, n.Mark(), "the YAML expands to more than " + std::to_string(kMaxRecipeNodes) +
                              " values through its aliases (an alias bomb?)");
    if (lines && !key.empty()) (*lines)[key] = n.Mark().line + 1;
    switch (n.Type()) {
      case YAML::NodeType::Null:
      case YAML::NodeType::Undefined: return nullptr;
      case YAML::NodeType::Scalar: return scalar(n, key);
      case YAML::NodeType::Sequence:
      case YAML::NodeType::Map: break;
    }
    for (const YAML::Node& p : path)
      if (p.is(n))
        fail(key, n.Mark(), "cyclic YAML alias: this value contains itself (an anchor used inside its own definition)");
    if (static_cast<int>(path.size()) >= kMaxRecipeDepth)
      fail(key, n.Mark(), "nested deeper than " + std::to_string(kMaxRecipeDepth) + " levels");
    path.push_back(n);
    json out;
    if (n.IsSequence()) {
      out = json::array();
      size_t i = 0;
      for (auto it = n.begin(); it != n.end(); ++it, ++i)
        out.push_back(convert(*it, key.empty() ? std::to_string(i) : key + "." + std::to_string(i)));
    } else {
      out = json::object();
      for (auto it = n.begin(); it != n.end(); ++it) {
        if (!it->first.IsScalar()) fail("", it->first.Mark(), "mapping keys must be plain strings");
        std::string k = it->first.Scalar();
        std::string full = key.empty() ? k : key + "." + k;
        if (out.contains(k)) fail("", it->first.Mark(), "duplicate key '" + full + "'");
        out[k] = convert(it->second, full);
        // A key's line is where the key is written (a section's value starts on a later line).
        if (lines) (*lines)[full] = it->first.Mark().line + 1;
      }
    }
    path.pop_back();
    return out;
  }
};

YAML::Node parse_yaml(const std::string& text, const std::string& name) {
  try {
    return YAML::Load(text);
  } catch (const YAML::DeepRecursion& e) {
    throw RecipeError(name + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1) +
                      ": YAML nested too deeply (" + std::to_string(kMaxRecipeDepth) + " levels of lists and mappings at most)");
  } catch (const YAML::Exception& e) {
    throw RecipeError(name + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1) +
                      ": YAML syntax error: " + e.msg);
  }
}

// A double for messages: inf, -inf and nan spelled as YAML would read them back.
std::string format_number(double d) {
  if (std::isnan(d)) return ".nan";
  if (std::isinf(d)) return d > 0 ? ".inf" : "-.inf";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.10g", d);
  return buf;
}

// A value for messages: numbers as format_number, anything else as JSON, cut when long.
std::string show_value(const json& v) {
  if (v.is_number_float()) return format_number(v.get<double>());
  std::string d = v.dump();
  return d.size() <= 80 ? d : d.substr(0, 64) + "... (" + std::to_string(d.size()) + " characters)";
}

std::string type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "a list";
  return "a mapping";
}

}  // namespace

Recipe Recipe::load(const std::string& path, const std::vector<std::string>& overrides) {
  // Only a regular file of bounded size: `automodel finetune /dev/zero` (or a FIFO, a directory) is refused
  // before anything is read, and a huge file is not slurped.
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) throw RecipeError("recipe file not found: " + path);
  if (fs::is_directory(st)) throw RecipeError("recipe " + path + " is a directory, not a YAML file");
  if (!fs::is_regular_file(st)) {
    const char* kind = fs::is_character_file(st) ? "a character device" : fs::is_block_file(st) ? "a block device"
                       : fs::is_fifo(st) ? "a pipe (FIFO)" : fs::is_socket(st) ? "a socket" : "an unknown kind";
    throw RecipeError("recipe " + path + " is not a regular file (" + kind + "); give the path of a YAML file");
  }
  const uintmax_t size = fs::file_size(path, ec);
  if (!ec && size > kMaxRecipeBytes)
    throw RecipeError("recipe " + path + " is " + std::to_string(size) + " bytes; a recipe may be at most " +
                      std::to_string(kMaxRecipeBytes >> 20) + " MiB");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RecipeError("cannot read recipe file: " + path);
  std::string text(kMaxRecipeBytes + 1, '\0');
  f.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(f.gcount()));
  if (text.size() > kMaxRecipeBytes)
    throw RecipeError("recipe " + path + " is larger than " + std::to_string(kMaxRecipeBytes >> 20) + " MiB");
  return from_string(text, path, overrides);
}

Recipe Recipe::from_string(const std::string& yaml, const std::string& name, const std::vector<std::string>& overrides) {
  Recipe r;
  r.path_ = name;
  YAML::Node root = parse_yaml(yaml, name);
  if (!root.IsNull() && !root.IsMap()) throw RecipeError(name + ": the recipe must be a YAML mapping at the top level");
  if (root.IsNull()) {
    r.root_ = json::object();
  } else {
    YamlConverter conv;
    conv.file = name;
    conv.lines = &r.lines_;
    r.root_ = conv.convert(root, "");
  }
  for (const auto& ov : overrides) {
    auto eq = ov.find('=');
    if (eq == std::string::npos || eq == 0)
      throw UsageError("bad override '--" + ov + "': expected --section.key=VALUE");
    std::string key = ov.substr(0, eq), val = ov.substr(eq + 1);
    YAML::Node vn = parse_yaml(val.empty() ? "~" : val, "override --" + key);
    YamlConverter conv;
    conv.override_key = key;
    json v = conv.convert(vn, "");
    json* cur = &r.root_;
    std::stringstream ks(key);
    std::string part, sofar;
    std::vector<std::string> parts;
    while (std::getline(ks, part, '.')) parts.push_back(part);
    for (size_t i = 0; i < parts.size(); ++i) {
      if (parts[i].empty()) throw UsageError("bad override key '--" + key + "'");
      sofar += (i ? "." : "") + parts[i];
      if (i + 1 == parts.size()) {
        (*cur)[parts[i]] = v;
      } else {
        if (!cur->contains(parts[i]) || (*cur)[parts[i]].is_null()) (*cur)[parts[i]] = json::object();
        if (!(*cur)[parts[i]].is_object())
          throw UsageError("override --" + key + ": '" + sofar + "' is not a section");
        cur = &(*cur)[parts[i]];
      }
    }
    // The override replaces the whole value: drop the file's lines for what was below it.
    for (auto it = r.lines_.lower_bound(key + "."); it != r.lines_.end() && it->first.rfind(key + ".", 0) == 0;)
      it = r.lines_.erase(it);
    r.lines_[key] = 0;
  }
  r.validate();
  return r;
}

void Recipe::validate() {
  // Every key against the key table (config/schema_table.cpp). All unknown keys are reported at once, each on
  // its own line with the nearest known key, so a recipe is fixed in one pass.
  const config::SchemaCheck c = config::check_keys(root_);
  std::vector<std::pair<int, std::string>> by_line;  // in file order
  auto line_of = [&](const std::string& k) {
    auto it = lines_.find(k);
    return it == lines_.end() ? 0 : it->second;
  };
  for (const auto& u : c.unknown)
    by_line.emplace_back(line_of(u.key), where(u.key) + ": unknown recipe key" +
                                             (u.suggestion.empty() ? "" : "; did you mean '" + u.suggestion + "'?"));
  for (const auto& [key, type] : c.not_a_section)
    by_line.emplace_back(line_of(key), where(key) + ": expected a mapping (section), got " + type);
  std::stable_sort(by_line.begin(), by_line.end(), [](auto& a, auto& b) { return a.first < b.first; });
  std::vector<std::string> errors;
  for (auto& [line, e] : by_line) errors.push_back(e);
  if (errors.size() == 1) throw RecipeError(errors[0] + " (the keys: docs/recipes.md)");
  if (!errors.empty()) {
    std::string msg = std::to_string(errors.size()) + " problems with the recipe's keys (the keys: docs/recipes.md):";
    for (auto& e : errors) msg += "\n  " + e;
    throw RecipeError(msg);
  }
  std::vector<std::pair<int, std::string>> warns;
  for (const auto& [key, what] : c.warnings) warns.emplace_back(line_of(key), where(key) + what);
  std::stable_sort(warns.begin(), warns.end(), [](auto& a, auto& b) { return a.first < b.first; });
  for (auto& [line, w] : warns) warnings_.push_back(w);
  normalize_automodel_forms();
  check_values();
}

// Values that cannot mean anything are refused here, when the recipe is read, with the key's location
// (before any model or dataset is loaded). Finer rules that need context (lr_decay_steps vs warm-up, batch
// sizes vs world size) stay with the code that reads the value; the dataset sections' counts and lengths
// are checked where they are read (data/registry.cpp, data/length_limit.cpp).
void Recipe::check_values() const {
  enum Rule { kIntGe0, kIntGe1, kFiniteGe0, kFiniteGt0, kFinite, kGt0NotNan };
  struct Check {
    const char* key;
    Rule rule;
  };
  static const Check kChecks[] = {
      {"step_scheduler.num_epochs", kIntGe0},  // 0: max_steps alone
      {"step_scheduler.ckpt_every_steps", kIntGe0},
      {"step_scheduler.val_every_steps", kIntGe0},
      {"step_scheduler.warmup_steps", kIntGe0},
      {"step_scheduler.timed_steps", kIntGe0},
      {"packed_sequence.packed_sequence_size", kIntGe0},
      {"optimizer.lr", kFiniteGe0},
      {"optimizer.eps", kFiniteGt0},
      {"optimizer.weight_decay", kFiniteGe0},
      {"optimizer.momentum", kFiniteGe0},
      {"optimizer.dampening", kFinite},
      {"lr_scheduler.lr_warmup_steps", kIntGe0},
      {"lr_scheduler.lr_decay_steps", kIntGe1},
      {"lr_scheduler.wd_incr_steps", kIntGe0},
      {"lr_scheduler.init_lr", kFiniteGe0},
      {"lr_scheduler.max_lr", kFiniteGe0},
      {"lr_scheduler.min_lr", kFiniteGe0},
      {"lr_scheduler.start_wd", kFiniteGe0},
      {"lr_scheduler.end_wd", kFiniteGe0},
      {"clip_grad_norm.max_norm", kGt0NotNan},  // null: no clipping; .inf: never clips
      {"checkpoint.keep_last_n", kIntGe0},
  };
  for (const Check& c : kChecks) {
    if (!has(c.key)) continue;
    switch (c.rule) {
      case kIntGe0:
      case kIntGe1: {
        const int64_t v = *get_opt_int(c.key), lo = c.rule == kIntGe0 ? 0 : 1;
        if (v < lo) fail(c.key, "must be >= " + std::to_string(lo) + ", got " + std::to_string(v));
        break;
      }
      default: {
        const double v = *get_opt_double(c.key);
        if (c.rule == kGt0NotNan) {
          if (!(v > 0)) fail(c.key, "must be > 0 (or null for no clipping), got " + format_number(v));
          break;
        }
        if (!std::isfinite(v)) fail(c.key, "must be a finite number, got " + format_number(v));
        if (c.rule == kFiniteGe0 && v < 0) fail(c.key, "must be >= 0, got " + format_number(v));
        if (c.rule == kFiniteGt0 && v <= 0) fail(c.key, "must be > 0, got " + format_number(v));
      }
    }
  }
}

std::string Recipe::dir() const {
  fs::path p(path_);
  return p.has_parent_path() ? p.parent_path().string() : ".";
}

static const json* find_node(const json& root, const std::string& key) {
  const json* cur = &root;
  std::stringstream ks(key);
  std::string part;
  while (std::getline(ks, part, '.')) {
    if (!cur->is_object() || !cur->contains(part)) return nullptr;
    cur = &(*cur)[part];
  }
  return cur;
}

bool Recipe::present(const std::string& key) const { return find_node(root_, key) != nullptr; }
bool Recipe::has(const std::string& key) const {
  auto* n = find_node(root_, key);
  return n && !n->is_null();
}
const json& Recipe::node(const std::string& key) const {
  auto* n = find_node(root_, key);
  if (!n) throw RecipeError(path_ + ": missing required key '" + key + "'");
  return *n;
}

std::string Recipe::where(const std::string& key) const {
  auto it = lines_.find(key);
  if (it == lines_.end()) {
    // Below an override's value (--optimizer='{lr: 1}'): name the override.
    for (std::string up = key; up.rfind('.') != std::string::npos;) {
      up.resize(up.rfind('.'));
      auto u = lines_.find(up);
      if (u != lines_.end() && u->second == 0) return "command-line override --" + up + " (key '" + key + "')";
    }
    // A section made by an override (--optimzer.lr=1 makes 'optimzer'): name the override.
    for (auto d = lines_.lower_bound(key + "."); d != lines_.end() && d->first.rfind(key + ".", 0) == 0; ++d)
      if (d->second == 0) return "command-line override --" + d->first + " (key '" + key + "')";
    return path_ + ": key '" + key + "'";
  }
  if (it->second == 0) return "command-line override --" + key;
  return path_ + ":" + std::to_string(it->second) + ": key '" + key + "'";
}

void Recipe::fail(const std::string& key, const std::string& what) const { throw RecipeError(where(key) + ": " + what); }

double Recipe::get_double(const std::string& key, double def) const {
  auto v = get_opt_double(key);
  return v ? *v : def;
}
std::optional<double> Recipe::get_opt_double(const std::string& key) const {
  auto* n = find_node(root_, key);
  if (!n || n->is_null()) return std::nullopt;
  if (!n->is_number() || n->is_boolean()) fail(key, "expected a number, got " + type_name(*n) + " " + show_value(*n));
  return n->get<double>();
}
int64_t Recipe::get_int(const std::string& key, int64_t def) const {
  auto v = get_opt_int(key);
  return v ? *v : def;
}
std::optional<int64_t> Recipe::get_opt_int(const std::string& key) const {
  auto* n = find_node(root_, key);
  if (!n || n->is_null()) return std::nullopt;
  if (n->is_number_float()) {
    const double d = n->get<double>();
    if (!std::isfinite(d)) fail(key, "expected an integer, got " + format_number(d));
    if (std::floor(d) != d) fail(key, "expected an integer, got a number " + n->dump());
    // 2^63 is the first double past int64's range; casting it (or more) would be undefined.
    if (d >= 9223372036854775808.0 || d < -9223372036854775808.0)
      fail(key, format_number(d) + " is out of range for an integer");
    return static_cast<int64_t>(d);
  }
  if (n->is_number_unsigned() && n->get<uint64_t>() > uint64_t(INT64_MAX))
    fail(key, std::to_string(n->get<uint64_t>()) + " is out of range for an integer");
  if (!n->is_number_integer()) fail(key, "expected an integer, got " + type_name(*n) + " " + show_value(*n));
  return n->get<int64_t>();
}
bool Recipe::get_bool(const std::string& key, bool def) const {
  auto* n = find_node(root_, key);
  if (!n || n->is_null()) return def;
  if (!n->is_boolean()) fail(key, "expected true or false, got " + type_name(*n) + " " + show_value(*n));
  return n->get<bool>();
}
std::string Recipe::get_string(const std::string& key, const std::string& def) const {
  auto* n = find_node(root_, key);
  if (!n || n->is_null()) return def;
  if (n->is_string()) return n->get<std::string>();
  if (n->is_number_float() && !std::isfinite(n->get<double>())) return format_number(n->get<double>());
  if (n->is_number() || n->is_boolean()) return n->dump();
  fail(key, "expected a string, got " + type_name(*n));
}
std::vector<double> Recipe::get_double_list(const std::string& key, const std::vector<double>& def) const {
  auto* n = find_node(root_, key);
  if (!n || n->is_null()) return def;
  if (!n->is_array()) fail(key, "expected a list of numbers, got " + type_name(*n));
  std::vector<double> out;
  for (auto& x : *n) {
    if (!x.is_number()) fail(key, "expected a list of numbers, found " + show_value(x));
    out.push_back(x.get<double>());
  }
  return out;
}

std::string Recipe::resolve_path(const std::string& value) const {
  if (value.empty()) return value;
  fs::path p(value);
  if (p.is_absolute() || fs::exists(p)) return value;
  fs::path alt = fs::path(dir()) / p;
  if (fs::exists(alt)) return alt.string();
  return value;
}

}  // namespace am
