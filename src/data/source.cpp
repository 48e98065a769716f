// Dataset names -> data files -> rows (source.h). How `datasets` (the HF library) decides which files make
// which split is followed closely, because recipes written for NeMo AutoModel rely on it: the split patterns
// of its data_files.py, the `configs:` of a dataset card, the hub's parquet-conversion layout, the names
// its Arrow cache gives files, and its split-slice grammar and rounding (arrow_reader.py).
#include "data/source.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <tuple>

#include "core/error.h"
#include "core/log.h"
#include "data/text_common.h"
#include "io/parquet.h"

// The Arrow IPC reader lands separately; until it does, .arrow files are refused with a clear message.
#if __has_include("io/arrow_ipc.h")
#include "io/arrow_ipc.h"
#define AM_SOURCE_HAVE_ARROW 1
#else
#define AM_SOURCE_HAVE_ARROW 0
#endif

namespace am {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------------------
// DataSource

std::vector<std::string> DataSource::split_names() const {
  std::vector<std::string> out;
  for (const auto& [name, files] : splits) out.push_back(name);
  return out;
}

const std::vector<DataFile>* DataSource::files_of(const std::string& split) const {
  if (single_file) return splits.empty() ? nullptr : &splits.front().second;
  for (const auto& [name, files] : splits)
    if (name == split) return &files;
  return nullptr;
}

std::string DataSource::describe() const {
  std::string s = name + " (" + kind + (root.empty() || root == name ? "" : " " + root);
  if (!config.empty()) s += ", config " + config;
  return s + ")";
}

DataSource single_file_source(const std::string& path) {
  DataSource s;
  s.name = path;
  s.kind = "local file";
  s.root = path;
  s.single_file = true;
  const std::string lower = [&] {
    std::string l = path;
    for (char& c : l) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return l;
  }();
  auto ends = [&](const char* e) {
    const size_t n = std::strlen(e);
    return lower.size() >= n && lower.compare(lower.size() - n, n, e) == 0;
  };
  DataFormat f = ends(".parquet") ? DataFormat::Parquet : ends(".arrow") ? DataFormat::Arrow
               : (ends(".json") || ends(".jsonl") || ends(".ndjson") || ends(".json.bz2") || ends(".jsonl.bz2"))
                   ? DataFormat::Json
                   : DataFormat::Text;
  s.splits.push_back({"train", {DataFile{path, f}}});
  return s;
}

namespace {

// ---------------------------------------------------------------------------------------------------------
// Environment and cache roots (huggingface_hub's constants.py and datasets' config.py).

std::string env(const char* k) {
  const char* v = std::getenv(k);
  return v ? std::string(v) : std::string();
}

std::string expand_home(const std::string& p) {
  if (p == "~" || p.rfind("~/", 0) == 0) {
    const std::string home = env("HOME");
    if (!home.empty()) return home + p.substr(1);
  }
  return p;
}

std::vector<std::string> roots_for(const char* direct_var, const char* sub) {
  std::vector<std::string> roots;
  auto add = [&](const std::string& r) {
    if (r.empty()) return;
    const std::string e = expand_home(r);
    if (std::find(roots.begin(), roots.end(), e) == roots.end()) roots.push_back(e);
  };
  add(env(direct_var));
  if (!env("HF_HOME").empty()) add(expand_home(env("HF_HOME")) + "/" + sub);
  if (!env("XDG_CACHE_HOME").empty()) add(expand_home(env("XDG_CACHE_HOME")) + "/huggingface/" + sub);
  if (!env("HOME").empty()) add(env("HOME") + "/.cache/huggingface/" + sub);
  return roots;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool ends_with(const std::string& s, const std::string& e) {
  return s.size() >= e.size() && s.compare(s.size() - e.size(), e.size(), e) == 0;
}

// huggingface_hub's validate_repo_id: "name" or "org/name", [A-Za-z0-9-_.], no "--" / "..", <= 96 chars.
bool valid_repo_id(const std::string& id) {
  if (id.empty() || id.size() > 96 || id.find("--") != std::string::npos || id.find("..") != std::string::npos)
    return false;
  int slashes = 0;
  for (char ch : id) {
    if (ch == '/') {
      ++slashes;
      continue;
    }
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_' && ch != '.') return false;
  }
  return slashes <= 1 && id.front() != '/' && id.back() != '/' && id.front() != '-' && id.front() != '.' &&
         id.back() != '.';
}

// A value written as a path (not a hub id): its "not found" message is about the file only.
bool looks_like_path(const std::string& v) {
  if (v.empty()) return false;
  if (v[0] == '/' || v[0] == '.' || v[0] == '~' || v.find('\\') != std::string::npos) return true;
  const std::string l = lower(v);
  for (const char* e : {".json", ".jsonl", ".ndjson", ".parquet", ".arrow", ".bz2", ".txt", ".csv"})
    if (ends_with(l, e)) return true;
  return std::count(v.begin(), v.end(), '/') > 1;
}

// The child of `dir` named `name`, matched exactly, else ignoring case (hub ids are case-insensitive:
// recipes say both "rowan/hellaswag" and "Rowan/hellaswag"). "" when none.
std::string child_named(const fs::path& dir, const std::string& name) {
  std::error_code ec;
  if (fs::is_directory(dir / name, ec)) return (dir / name).string();
  const std::string want = lower(name);
  std::string hit;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (!e.is_directory(ec)) continue;
    if (lower(e.path().filename().string()) == want) {
      if (hit.empty() || e.path().string() < hit) hit = e.path().string();
    }
  }
  return hit;
}

// datasets' camelcase_to_snakecase: "HellaSwag" -> "hella_swag"; how its cache names a dataset.
std::string snake_case(const std::string& name) {
  static const std::regex upper_upper("([A-Z]+)([A-Z][a-z])"), lower_upper("([a-z0-9])([A-Z])");
  std::string s = std::regex_replace(name, upper_upper, "$1_$2");
  s = std::regex_replace(s, lower_upper, "$1_$2");
  return lower(s);
}

// ---------------------------------------------------------------------------------------------------------
// Data files of a folder, and HF's rules for splitting them.

constexpr size_t kMaxListedFiles = 200000;  // a folder this large is not a dataset (a mistyped path: "/")

std::optional<DataFormat> format_of_name(const std::string& name) {
  std::string l = lower(name);
  if (ends_with(l, ".bz2")) {
    l.resize(l.size() - 4);
    if (ends_with(l, ".parquet") || ends_with(l, ".arrow")) return std::nullopt;  // compressed binary: no
  }
  if (ends_with(l, ".json") || ends_with(l, ".jsonl") || ends_with(l, ".ndjson")) return DataFormat::Json;
  if (ends_with(l, ".parquet")) return DataFormat::Parquet;
  if (ends_with(l, ".arrow")) return DataFormat::Arrow;
  if (ends_with(l, ".txt")) return DataFormat::Text;
  return std::nullopt;
}

// Files `datasets` never takes as data (its FILES_TO_IGNORE, plus state.json of save_to_disk folders).
bool ignored_file(const std::string& base) {
  static const std::set<std::string> names = {"README.md",         "config.json",       "dataset_info.json",
                                              "dataset_infos.json", "dummy_data.zip",   "dataset_dict.json",
                                              "state.json"};
  return names.count(base) > 0;
}

// Every data file under `root`, as sorted '/'-separated relative paths. Hidden parts (".x") and special
// folders ("__x") are skipped, as datasets' resolve_pattern skips them; symlinks (the hub cache's snapshot
// files point into blobs/) are followed.
std::vector<std::string> list_data_files(const fs::path& root) {
  std::vector<std::string> out;
  std::error_code ec;
  fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, ec), end;
  for (; !ec && it != end; it.increment(ec)) {
    const std::string base = it->path().filename().string();
    if (base.empty()) continue;
    const bool is_dir = it->is_directory(ec);
    if (base[0] == '.' || (is_dir && base.rfind("__", 0) == 0)) {
      if (is_dir) it.disable_recursion_pending();
      continue;
    }
    if (is_dir || !fs::is_regular_file(it->path(), ec) || ignored_file(base) || !format_of_name(base)) continue;
    // Lexically: fs::relative would resolve the hub cache's symlinks into blobs/.
    out.push_back(it->path().lexically_relative(root).generic_string());
    if (out.size() > kMaxListedFiles)
      throw DataError(root.string() + ": more than " + std::to_string(kMaxListedFiles) +
                      " files under the folder; point the dataset at the folder that holds the data");
  }
  std::sort(out.begin(), out.end());
  return out;
}

// fsspec / Python glob semantics (fsspec >= 2023.12): '*' and '?' stay within one path part, "**/" is zero
// or more folders, a trailing "**" anything below, "[...]" a character class ("[!...]" negated).
std::regex glob_regex(const std::string& g) {
  std::string r;
  size_t i = 0;
  while (i < g.size()) {
    const char c = g[i];
    if (c == '*') {
      if (i + 1 < g.size() && g[i + 1] == '*') {
        if (i + 2 < g.size() && g[i + 2] == '/') {
          r += "(?:.*/)?";
          i += 3;
        } else {
          r += ".*";
          i += 2;
        }
        continue;
      }
      r += "[^/]*";
      ++i;
      continue;
    }
    if (c == '?') {
      r += "[^/]";
      ++i;
      continue;
    }
    if (c == '[') {
      size_t j = i + 1;
      if (j < g.size() && (g[j] == '!' || g[j] == '^')) ++j;
      if (j < g.size() && g[j] == ']') ++j;
      while (j < g.size() && g[j] != ']') ++j;
      if (j < g.size()) {
        std::string cls = g.substr(i + 1, j - i - 1);
        r += '[';
        size_t k = 0;
        if (!cls.empty() && (cls[0] == '!' || cls[0] == '^')) {
          r += '^';
          k = 1;
        }
        for (; k < cls.size(); ++k) {
          if (cls[k] == '\\' || cls[k] == '[' || cls[k] == ']') r += '\\';
          r += cls[k];
        }
        r += ']';
        i = j + 1;
        continue;
      }
    }
    if (std::string(".^$|()+{}\\[]").find(c) != std::string::npos) r += '\\';
    r += c;
    ++i;
  }
  return std::regex(r, std::regex::ECMAScript);
}

// The files of `files` (relative to the same root) matched by any of `patterns`, in pattern order
// (each pattern's matches sorted), without repeats.
std::vector<std::string> match_patterns(const std::vector<std::string>& files, const std::vector<std::string>& patterns) {
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (const auto& p : patterns) {
    const std::regex re = glob_regex(p);
    for (const auto& f : files)
      if (std::regex_match(f, re) && seen.insert(f).second) out.push_back(f);
  }
  return out;
}

using SplitFiles = std::vector<std::pair<std::string, std::vector<std::string>>>;  // split -> relative paths

const char* kDefaultSplits[] = {"train", "validation", "test"};
const std::map<std::string, std::vector<std::string>> kSplitKeywords = {
    {"train", {"train", "training"}},
    {"validation", {"validation", "valid", "dev", "val"}},
    {"test", {"test", "testing", "eval", "evaluation"}},
};
const std::string kSep = "[-._ 0-9]";  // datasets' NON_WORDS_CHARS

bool valid_split_name(const std::string& s) {
  static const std::regex re(R"(^\w+(\.\w+)*$)");
  return std::regex_match(s, re);
}

// Default splits first, then the others sorted (datasets' order).
void order_splits(SplitFiles& sf) {
  std::stable_sort(sf.begin(), sf.end(), [](const auto& a, const auto& b) {
    auto rank = [](const std::string& n) {
      for (int i = 0; i < 3; ++i)
        if (n == kDefaultSplits[i]) return i;
      return 3;
    };
    const int ra = rank(a.first), rb = rank(b.first);
    return ra != rb ? ra < rb : (ra == 3 && a.first < b.first);
  });
}

// Shards named "<split>-NNNNN-of-NNNNN.<ext>" directly in `prefix` ("data/" for datasets' SPLIT_PATTERN_SHARDED,
// a config folder of the hub's parquet conversion): split name -> files. Empty when none.
SplitFiles sharded_splits(const std::vector<std::string>& files, const std::string& prefix, const std::string& where) {
  static const std::regex shard(R"(^(.+)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*$)");
  std::map<std::string, std::vector<std::string>> by;
  for (const auto& f : files) {
    if (f.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string rest = f.substr(prefix.size());
    std::smatch m;
    if (rest.find('/') != std::string::npos || !std::regex_match(rest, m, shard)) continue;
    if (!valid_split_name(m[1].str()))
      throw DataError(where + ": data file " + f + " names split '" + m[1].str() +
                      "', which is not a valid split name (letters, digits, '_' and '.')");
    by[m[1].str()].push_back(f);
  }
  SplitFiles out(by.begin(), by.end());
  order_splits(out);
  return out;
}

// datasets' get_data_patterns over `files`: sharded "data/<split>-NNNNN-of-NNNNN.*", then split keywords in
// folder names, then in file names, then everything is "train".
SplitFiles infer_splits(const std::vector<std::string>& files, const std::string& where) {
  if (files.empty()) return {};
  SplitFiles sf = sharded_splits(files, "data/", where);
  if (!sf.empty()) return sf;
  const std::vector<std::string> dir_bases = {"**/{k}/**", "**/{k}" + kSep + "*/**", "**/*" + kSep + "{k}/**",
                                              "**/*" + kSep + "{k}" + kSep + "*/**"};
  const std::vector<std::string> file_bases = {"**/{k}" + kSep + "*", "**/*" + kSep + "{k}" + kSep + "*"};
  for (const auto* bases : {&dir_bases, &file_bases}) {
    SplitFiles found;
    for (const char* split : kDefaultSplits) {
      std::vector<std::string> patterns;
      for (const auto& k : kSplitKeywords.at(split))
        for (std::string b : *bases) {
          for (size_t p = b.find("{k}"); p != std::string::npos; p = b.find("{k}")) b.replace(p, 3, k);
          patterns.push_back(b);
        }
      auto m = match_patterns(files, patterns);
      if (!m.empty()) found.push_back({split, m});
    }
    if (!found.empty()) return found;
  }
  return {{"train", files}};
}

// Inside a config folder of the hub's parquet conversion: "<split>-NNNNN-of-NNNNN.parquet", or one folder
// per split ("<split>/0000.parquet", any split name); else datasets' patterns.
SplitFiles infer_config_splits(const std::vector<std::string>& files, const std::string& where) {
  SplitFiles sf = sharded_splits(files, "", where);
  if (!sf.empty()) return sf;
  std::map<std::string, std::vector<std::string>> by;
  bool per_dir = !files.empty();
  for (const auto& f : files) {
    const size_t slash = f.find('/');
    // Split folders may be named "partial-train" (a partial conversion): word characters, '.', '-'.
    static const std::regex dir_name(R"(^[\w.-]+$)");
    if (slash == std::string::npos || f.find('/', slash + 1) != std::string::npos ||
        !std::regex_match(f.substr(0, slash), dir_name)) {
      per_dir = false;
      break;
    }
    by[f.substr(0, slash)].push_back(f);
  }
  if (per_dir) {
    sf.assign(by.begin(), by.end());
    order_splits(sf);
    return sf;
  }
  return infer_splits(files, where);
}

// The dataset card's YAML header (README.md between "---" lines): its `configs:` list, as datasets' MetadataConfigs.
struct CardConfig {
  std::string name, data_dir;
  bool is_default = false;
  SplitFiles patterns;  // split -> glob patterns relative to the repository (data_dir applied); empty: infer
};

std::vector<CardConfig> read_card_configs(const fs::path& root) {
  std::ifstream f(root / "README.md");
  if (!f) return {};
  std::string line, yaml;
  if (!std::getline(f, line) || line.rfind("---", 0) != 0) return {};
  bool closed = false;
  while (std::getline(f, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line == "---") {
      closed = true;
      break;
    }
    yaml += line + "\n";
    if (yaml.size() > (4u << 20)) return {};
  }
  if (!closed) return {};
  std::vector<CardConfig> out;
  try {
    YAML::Node doc = YAML::Load(yaml);
    if (!doc.IsMap() || !doc["configs"] || !doc["configs"].IsSequence()) return {};
    for (const auto& c : doc["configs"]) {
      if (!c.IsMap() || !c["config_name"]) continue;
      CardConfig cc;
      cc.name = c["config_name"].as<std::string>();
      cc.is_default = c["default"] && c["default"].as<bool>(false);
      if (c["data_dir"]) cc.data_dir = c["data_dir"].as<std::string>();
      const std::string pre = cc.data_dir.empty() ? "" : cc.data_dir + (ends_with(cc.data_dir, "/") ? "" : "/");
      auto as_list = [&](const YAML::Node& n) {
        std::vector<std::string> v;
        if (n.IsScalar()) v.push_back(pre + n.as<std::string>());
        else if (n.IsSequence())
          for (const auto& x : n) v.push_back(pre + x.as<std::string>());
        return v;
      };
      const YAML::Node df = c["data_files"];
      if (df && df.IsScalar()) {
        cc.patterns.push_back({"train", as_list(df)});
      } else if (df && df.IsSequence()) {
        bool dicts = df.size() > 0 && df[0].IsMap();
        if (!dicts) cc.patterns.push_back({"train", as_list(df)});
        else
          for (const auto& e : df)
            if (e.IsMap() && e["split"] && e["path"]) cc.patterns.push_back({e["split"].as<std::string>(), as_list(e["path"])});
      } else if (df && df.IsMap()) {
        for (const auto& kv : df) cc.patterns.push_back({kv.first.as<std::string>(), as_list(kv.second)});
      }
      out.push_back(std::move(cc));
    }
  } catch (const YAML::Exception& e) {
    log::warn((root / "README.md").string() + ": the dataset card's YAML header is unreadable (" +
              std::string(e.what()).substr(0, 120) + "); splitting the files by their names instead");
    return {};
  }
  return out;
}

std::string join(const std::vector<std::string>& v, const std::string& sep = ", ") {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

// Subfolders of `root` that hold data files (candidate configs).
std::vector<std::string> data_subfolders(const fs::path& root, const std::vector<std::string>& files) {
  std::set<std::string> s;
  for (const auto& f : files) {
    const size_t slash = f.find('/');
    if (slash != std::string::npos) s.insert(f.substr(0, slash));
  }
  return {s.begin(), s.end()};
}

// A folder (local, or a hub snapshot) -> its splits, choosing the config as `datasets` does.
void split_folder(DataSource& src, const fs::path& root, const DataSourceOptions& o) {
  const std::vector<std::string> files = list_data_files(root);
  const std::string where = src.describe();
  SplitFiles sf;
  std::string base;  // relative folder the split files are under ("" = root)
  const auto card = read_card_configs(root);
  if (!card.empty()) {
    const CardConfig* pick = nullptr;
    std::vector<std::string> names;
    for (const auto& c : card) names.push_back(c.name);
    if (!o.config.empty()) {
      for (const auto& c : card)
        if (c.name == o.config) pick = &c;
      if (!pick)
        throw DataError(o.config_key + ": '" + o.config + "' is not a config of " + where + " (its configs: " + join(names) + ")");
    } else {
      for (const auto& c : card)
        if (c.is_default && !pick) pick = &c;
      for (const auto& c : card)
        if (!pick && c.name == "default") pick = &c;
      if (!pick && card.size() == 1) pick = &card[0];
      if (!pick)
        throw DataError(src.key + ": " + where + " has several configs (" + join(names) + ") and none is the default: set " +
                        o.config_key + " to one of them");
    }
    src.config = pick->name;
    if (!pick->patterns.empty()) {
      for (const auto& [split, pats] : pick->patterns) {
        auto m = match_patterns(files, pats);
        if (!m.empty()) sf.push_back({split, m});
      }
      if (sf.empty())
        throw DataError(where + ": config '" + pick->name + "' lists data files (" + join(pick->patterns.front().second) +
                        ") that are not in the folder (a partial download? fetch the whole dataset)");
    } else {
      base = pick->data_dir;
      while (!base.empty() && base.back() == '/') base.pop_back();
    }
  } else {
    const auto subs = data_subfolders(root, files);
    if (!o.config.empty()) {
      if (std::find(subs.begin(), subs.end(), o.config) == subs.end())
        throw DataError(o.config_key + ": '" + o.config + "' is not a config of " + where +
                        (subs.empty() ? " (it has no config folders)" : " (its folders: " + join(subs) + ")"));
      base = o.config;
    } else {
      for (const char* d : {"default", "plain_text"})
        if (base.empty() && std::find(subs.begin(), subs.end(), d) != subs.end()) base = d;
    }
    src.config = base;
  }
  if (sf.empty()) {
    std::vector<std::string> sub;
    const std::string pre = base.empty() ? "" : base + "/";
    for (const auto& f : files)
      if (f.compare(0, pre.size(), pre) == 0) sub.push_back(f.substr(pre.size()));
    sf = base.empty() ? infer_splits(sub, where) : infer_config_splits(sub, where);
    for (auto& [split, fl] : sf)
      for (auto& f : fl) f = pre + f;
  }
  if (sf.empty()) {
    // A repository with a loading script (no data files of its own): the hub's parquet conversion has them.
    bool script = false;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(root, ec))
      if (e.path().extension() == ".py") script = true;
    throw DataError(src.key + ": " + where + " holds no data files (.json, .jsonl, .parquet, .arrow or .txt)" +
                    (files.empty() ? "" : " under the config chosen") +
                    (script ? ": it is a loading-script dataset; download its parquet conversion instead (`hf download "
                              "--repo-type dataset " + src.name + " --revision refs/convert/parquet`) and set revision: "
                              "refs/convert/parquet"
                            : ""));
  }
  // One format per dataset, the most common one (datasets infers one builder module and drops other files).
  std::map<DataFormat, size_t> count;
  for (const auto& [split, fl] : sf)
    for (const auto& f : fl) ++count[*format_of_name(f)];
  DataFormat fmt = DataFormat::Parquet;
  size_t best = 0;
  for (DataFormat f : {DataFormat::Parquet, DataFormat::Arrow, DataFormat::Json, DataFormat::Text})
    if (count[f] > best) {
      best = count[f];
      fmt = f;
    }
  for (auto& [split, fl] : sf) {
    std::vector<DataFile> df;
    for (const auto& f : fl)
      if (*format_of_name(f) == fmt) df.push_back({(root / f).string(), fmt});
    if (!df.empty()) src.splits.push_back({split, std::move(df)});
  }
}

// ---------------------------------------------------------------------------------------------------------
// The hub cache: <root>/datasets--org--name/{refs/main, snapshots/<rev>/...}.

// The snapshot of `revision`: a ref under refs/ (a branch or tag, "convert/parquet") or a snapshot hash.
// Not there -> DataError naming what is.
std::string pick_revision(const fs::path& repo, const DataSourceOptions& o) {
  std::error_code ec;
  std::string rev = o.revision;
  if (rev.rfind("refs/", 0) == 0) rev = rev.substr(5);
  const bool safe = rev.find("..") == std::string::npos && !rev.empty() && rev[0] != '/';
  if (safe) {
    std::ifstream ref(repo / "refs" / rev);
    std::string hash;
    if (ref && std::getline(ref, hash)) {
      while (!hash.empty() && std::isspace(static_cast<unsigned char>(hash.back()))) hash.pop_back();
      if (!hash.empty() && hash.find('/') == std::string::npos && hash != ".." && fs::is_directory(repo / "snapshots" / hash, ec))
        return (repo / "snapshots" / hash).string();
    }
    if (rev.find('/') == std::string::npos && fs::is_directory(repo / "snapshots" / rev, ec))
      return (repo / "snapshots" / rev).string();
  }
  std::vector<std::string> have;
  for (const auto& e : fs::recursive_directory_iterator(repo / "refs", ec))
    if (e.is_regular_file(ec)) have.push_back(fs::relative(e.path(), repo / "refs", ec).generic_string());
  for (const auto& e : fs::directory_iterator(repo / "snapshots", ec)) have.push_back(e.path().filename().string());
  std::string list;
  for (const auto& h : have) list += (list.empty() ? "" : ", ") + h;
  throw DataError(o.revision_key + ": revision '" + o.revision + "' is not in the cache at " + repo.string() +
                  " (refs and snapshots there: " + (list.empty() ? "none" : list) + ")");
}

// The snapshot refs/main names, else the newest one; "" when there is none.
std::string pick_snapshot(const fs::path& repo, std::string* note) {
  std::error_code ec;
  const fs::path snaps = repo / "snapshots";
  std::ifstream ref(repo / "refs" / "main");
  if (ref) {
    std::string hash;
    std::getline(ref, hash);
    while (!hash.empty() && std::isspace(static_cast<unsigned char>(hash.back()))) hash.pop_back();
    if (!hash.empty() && hash.find('/') == std::string::npos && hash != "." && hash != ".." &&
        fs::is_directory(snaps / hash, ec))
      return (snaps / hash).string();
    *note += " (" + (repo / "refs" / "main").string() + " names " + hash + ", which is not in snapshots/)";
  }
  std::string best;
  fs::file_time_type best_t{};
  for (const auto& e : fs::directory_iterator(snaps, ec)) {
    if (!e.is_directory(ec)) continue;
    const auto t = e.last_write_time(ec);
    if (best.empty() || t > best_t || (t == best_t && e.path().string() > best)) {
      best = e.path().string();
      best_t = t;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------------------
// The datasets cache: <root>/<org>___<name>/<config>/<version>/<hash>/<name>-<split>[-NNNNN-of-NNNNN].arrow.

bool arrow_cache_splits(DataSource& src, const fs::path& ds_dir, const std::string& id, const DataSourceOptions& o) {
  std::error_code ec;
  const std::string short_name = snake_case(id.substr(id.find('/') == std::string::npos ? 0 : id.find('/') + 1));
  // Config folders that hold a finished build (a <version>/<hash>/ with .arrow files).
  auto builds_of = [&](const fs::path& cfg) {
    std::vector<fs::path> out;
    for (const auto& v : fs::directory_iterator(cfg, ec)) {
      if (!v.is_directory(ec)) continue;
      for (const auto& h : fs::directory_iterator(v.path(), ec)) {
        if (!h.is_directory(ec) || ends_with(h.path().filename().string(), ".incomplete")) continue;
        bool has = false;
        for (const auto& f : fs::directory_iterator(h.path(), ec))
          if (ends_with(f.path().filename().string(), ".arrow")) has = true;
        if (has) out.push_back(h.path());
      }
    }
    return out;
  };
  std::vector<std::string> configs;
  for (const auto& c : fs::directory_iterator(ds_dir, ec))
    if (c.is_directory(ec) && !builds_of(c.path()).empty()) configs.push_back(c.path().filename().string());
  std::sort(configs.begin(), configs.end());
  if (configs.empty()) return false;
  std::string cfg;
  if (!o.config.empty()) {
    // A config built with extra arguments is cached as "<config>-<hash>".
    for (const auto& c : configs)
      if (c == o.config || (cfg.empty() && c.rfind(o.config + "-", 0) == 0)) cfg = c;
    if (cfg.empty())
      throw DataError(o.config_key + ": '" + o.config + "' is not a config of " + id + " in the datasets cache " +
                      ds_dir.string() + " (configs there: " + join(configs) + ")");
  } else {
    for (const char* d : {"default", "plain_text"})
      if (cfg.empty() && std::find(configs.begin(), configs.end(), d) != configs.end()) cfg = d;
    if (cfg.empty() && configs.size() == 1) cfg = configs[0];
    if (cfg.empty())
      throw DataError(src.key + ": " + id + " in the datasets cache " + ds_dir.string() + " has several configs (" +
                      join(configs) + "): set " + o.config_key + " to one of them");
  }
  // The newest build of the config.
  auto builds = builds_of(ds_dir / cfg);
  fs::path build;
  fs::file_time_type bt{};
  for (const auto& b : builds) {
    const auto t = fs::last_write_time(b, ec);
    if (build.empty() || t > bt || (t == bt && b.string() > build.string())) {
      build = b;
      bt = t;
    }
  }
  // Split names: from the file names (<name>-<split>[-NNNNN-of-NNNNN].arrow), else from dataset_info.json.
  std::vector<std::string> info_splits;
  {
    std::ifstream f(build / "dataset_info.json");
    if (f) {
      try {
        auto j = nlohmann::json::parse(f, nullptr, true);
        if (j.contains("splits") && j["splits"].is_object())
          for (auto& [k, v] : j["splits"].items()) info_splits.push_back(k);
      } catch (const nlohmann::json::exception&) {
      }
    }
  }
  static const std::regex shard_suffix(R"(-[0-9]{5}-of-[0-9]{5}$)");
  std::map<std::string, std::vector<std::string>> by;
  for (const auto& f : fs::directory_iterator(build, ec)) {
    std::string base = f.path().filename().string();
    if (!ends_with(base, ".arrow") || base.rfind("cache-", 0) == 0) continue;  // cache-*.arrow: map() results
    std::string stem = std::regex_replace(base.substr(0, base.size() - 6), shard_suffix, "");
    std::string split;
    if (stem.rfind(short_name + "-", 0) == 0) split = stem.substr(short_name.size() + 1);
    for (const auto& s : info_splits)
      if (split.empty() && ends_with(stem, "-" + s)) split = s;
    if (split.empty()) continue;
    by[split].push_back(f.path().string());
  }
  if (by.empty()) return false;
  SplitFiles sf;
  for (auto& [s, fl] : by) {
    std::sort(fl.begin(), fl.end());
    sf.push_back({s, fl});
  }
  order_splits(sf);
  src.kind = "HF datasets cache";
  src.root = build.string();
  src.config = cfg;
  for (const auto& [s, fl] : sf) {
    std::vector<DataFile> df;
    for (const auto& f : fl) df.push_back({f, DataFormat::Arrow});
    src.splits.push_back({s, std::move(df)});
  }
  return true;
}

}  // namespace

std::vector<std::string> hub_cache_roots() { return roots_for("HF_HUB_CACHE", "hub"); }
std::vector<std::string> datasets_cache_roots() { return roots_for("HF_DATASETS_CACHE", "datasets"); }

DataSource resolve_data_source(const std::string& name, const std::string& local_in, const DataSourceOptions& o) {
  std::error_code ec;
  const std::string local = expand_home(local_in.empty() ? name : local_in);
  DataSource src;
  src.name = name;
  src.key = o.key;
  if (name.empty()) throw RecipeError(o.key + ": empty dataset name");
  if (fs::is_regular_file(local, ec)) {
    DataSource s = single_file_source(local);
    s.name = name;
    s.key = o.key;
    return s;
  }
  if (fs::is_directory(local, ec)) {
    src.kind = "local folder";
    src.root = local;
    split_folder(src, local, o);
    return src;
  }
  if (fs::exists(local, ec)) throw IoError(o.key + ": " + local + " is neither a file nor a folder");
  if (looks_like_path(name) || !valid_repo_id(name))
    throw DataError(o.key + ": no such file or folder: " + local +
                    (local != name ? " (given as '" + name + "', relative to the current folder or the recipe's)" : ""));

  // A hub id: the hub cache first (the dataset repository's own files), then the datasets library's cache.
  std::vector<std::string> tried;
  std::string note;
  std::string repo_folder = "datasets--" + name;
  for (size_t i = repo_folder.find('/'); i != std::string::npos; i = repo_folder.find('/', i)) repo_folder.replace(i, 1, "--");
  for (const auto& root : hub_cache_roots()) {
    const std::string repo = child_named(root, repo_folder);
    tried.push_back((fs::path(root) / repo_folder).string());
    if (repo.empty()) continue;
    const std::string snap = o.revision.empty() ? pick_snapshot(repo, &note) : pick_revision(repo, o);
    if (snap.empty()) {
      tried.back() += " (no snapshot)";
      continue;
    }
    src.kind = "HF hub cache";
    src.root = snap;
    split_folder(src, snap, o);
    return src;
  }
  const size_t slash = name.find('/');
  const std::string ds_folder = slash == std::string::npos
                                    ? snake_case(name)
                                    : name.substr(0, slash) + "___" + snake_case(name.substr(slash + 1));
  for (const auto& root : datasets_cache_roots()) {
    const std::string dir = child_named(root, ds_folder);
    tried.push_back((fs::path(root) / ds_folder).string());
    if (dir.empty()) continue;
    if (arrow_cache_splits(src, dir, name, o)) return src;
    tried.back() += " (no finished build)";
  }
  throw DataError(
      o.key + ": dataset '" + name + "' is not a local file or folder" + (local != name ? " (" + local + ")" : "") +
      " and is not in the local Hugging Face caches" + note + ". Looked in: " + join(tried) +
      ". Nothing is downloaded here: on a machine with internet run `hf download --repo-type dataset " + name +
      "` (or `huggingface-cli download --repo-type dataset " + name + "`) and copy its cache folder (" + repo_folder +
      ") into " + (hub_cache_roots().empty() ? std::string("~/.cache/huggingface/hub") : hub_cache_roots().front()) +
      " here (or set HF_HUB_CACHE / HF_HOME to where it is), or set " + o.key + " to a local .jsonl/.json/.parquet file or folder");
}

// ---------------------------------------------------------------------------------------------------------
// Split expressions (datasets' arrow_reader.py: _SUB_SPEC_RE, _rel_to_abs_instr).

namespace {
int64_t parse_bound(const std::string& s, const std::string& key, const std::string& term) {
  // Python int(): digits with single '_' between them, optional '-'.
  static const std::regex num(R"(^-?[0-9]+(_[0-9]+)*$)");
  if (!std::regex_match(s, num)) throw RecipeError(key + ": bad slice bound '" + s + "' in split '" + term + "'");
  std::string d;
  for (char c : s)
    if (c != '_') d += c;
  if (d.size() > 18) throw RecipeError(key + ": slice bound '" + s + "' in split '" + term + "' is out of range");
  return std::stoll(d);
}
}  // namespace

std::vector<SplitSpec> parse_split(const std::string& text, const std::string& key) {
  static const std::regex term_re(R"(^(\w+(?:\.\w+)*)(?:\[(?:(-?[0-9_]+)(%)?)?:(?:(-?[0-9_]+)(%)?)?\])?(?:\(([^)]*)\))?$)");
  std::string t = text;
  while (!t.empty() && std::isspace(static_cast<unsigned char>(t.back()))) t.pop_back();
  while (!t.empty() && std::isspace(static_cast<unsigned char>(t.front()))) t.erase(t.begin());
  if (t.empty()) throw RecipeError(key + ": empty split (e.g. train, validation, train[:1000], train[10%:20%], train+validation)");
  std::vector<SplitSpec> out;
  std::vector<std::string> terms(1);
  for (char c : t) {
    if (c == '+') terms.emplace_back();
    else terms.back() += c;
  }
  for (std::string term : terms) {
    while (!term.empty() && std::isspace(static_cast<unsigned char>(term.back()))) term.pop_back();
    while (!term.empty() && std::isspace(static_cast<unsigned char>(term.front()))) term.erase(term.begin());
    std::smatch m;
    if (!std::regex_match(term, m, term_re))
      throw RecipeError(key + ": unrecognized split '" + term +
                        "' (expected NAME, NAME[a:b] with row or percent bounds such as train[:1000] or train[10%:20%], "
                        "joined by '+')");
    SplitSpec s;
    s.text = term;
    s.split = m[1].str();
    if (m[2].matched) s.from = parse_bound(m[2].str(), key, term);
    if (m[4].matched) s.to = parse_bound(m[4].str(), key, term);
    s.percent = m[3].matched || m[5].matched;
    if (m[6].matched) {
      const std::string r = m[6].str();
      if (r != "closest" && r != "pct1_dropremainder")
        throw RecipeError(key + ": rounding '" + r + "' in split '" + term + "' must be closest or pct1_dropremainder");
      if (!s.percent) throw RecipeError(key + ": split '" + term + "': a rounding is only allowed with percent slicing");
      s.pct1_dropremainder = r == "pct1_dropremainder";
    }
    if (s.percent)
      for (const auto& b : {s.from, s.to})
        if (b && std::abs(*b) > 100)
          throw RecipeError(key + ": split '" + term + "': percent bounds must be between -100% and 100%");
    out.push_back(std::move(s));
  }
  return out;
}

bool split_needs_count(const SplitSpec& s) {
  return s.percent || (s.from && *s.from < 0) || (s.to && *s.to < 0);
}

std::pair<int64_t, int64_t> split_bounds(const SplitSpec& s, int64_t n) {
  int64_t from, to;
  if (s.percent) {
    auto pct = [&](int64_t b) -> int64_t {
      if (s.pct1_dropremainder) {
        if (n < 100)
          throw DataError("split '" + s.text + "': pct1_dropremainder rounding on a split of fewer than 100 rows (" +
                          std::to_string(n) + ") always gives nothing");
        return b * (n / 100);
      }
      // Python's int(round(b * n / 100.0)): the nearest row, ties to even.
      return static_cast<int64_t>(std::nearbyint(static_cast<double>(b * n) / 100.0));
    };
    from = s.from ? pct(*s.from) : 0;
    to = s.to ? pct(*s.to) : n;
  } else {
    from = s.from.value_or(0);
    to = s.to.value_or(n);
  }
  if (from < 0) from = std::max<int64_t>(n + from, 0);
  if (to < 0) to = std::max<int64_t>(n + to, 0);
  from = std::min(from, n);
  to = std::min(to, n);
  return {from, std::max(from, to)};
}

// ---------------------------------------------------------------------------------------------------------
// Row files.

namespace {

class JsonRowFile : public RowFile {
 public:
  explicit JsonRowFile(std::string path) : path_(std::move(path)) {}
  int64_t num_rows() override {
    if (count_ < 0) {
      JsonRowReader r(path_, 0);
      int64_t n = 0;
      while (r.skip()) ++n;
      count_ = n;
    }
    return count_;
  }
  int64_t read(int64_t begin, int64_t end, const std::function<bool(JsonRow&&)>& fn) override {
    JsonRowReader r(path_, 0);
    int64_t i = 0;
    for (; i < begin; ++i)
      if (!r.skip()) return count_ = i;
    JsonRow row;
    for (; end < 0 || i < end; ++i) {
      if (!r.next(row)) return count_ = i;
      if (!fn(std::move(row))) return -1;
    }
    return -1;
  }

 private:
  std::string path_;
  int64_t count_ = -1;
};

template <class Reader>
class ColumnarRowFile : public RowFile {
 public:
  explicit ColumnarRowFile(const std::string& path) : path_(path), reader_(path) {}
  int64_t num_rows() override { return reader_.num_rows(); }
  int64_t read(int64_t begin, int64_t end, const std::function<bool(JsonRow&&)>& fn) override {
    const int64_t n = reader_.num_rows();
    const int64_t stop = end < 0 ? n : std::min(end, n);
    bool stopped = false;
    if (begin < stop)
      reader_.read_rows(begin, stop, [&](int64_t i, nlohmann::ordered_json&& v) {
        if (fn(JsonRow{path_ + "[row " + std::to_string(i) + "]", std::move(v)})) return true;
        stopped = true;
        return false;
      });
    return stopped || stop < n ? -1 : n;
  }

 private:
  std::string path_;
  Reader reader_;
};

}  // namespace

std::unique_ptr<RowFile> open_row_file(const DataFile& f) {
  switch (f.format) {
    case DataFormat::Parquet:
      return std::make_unique<ColumnarRowFile<io::ParquetReader>>(f.path);
    case DataFormat::Arrow:
#if AM_SOURCE_HAVE_ARROW
      return std::make_unique<ColumnarRowFile<io::ArrowIpcReader>>(f.path);
#else
      throw FormatError(f.path + ": Arrow files cannot be read by this build yet (convert to parquet or JSONL)");
#endif
    case DataFormat::Json:
    case DataFormat::Text:
      break;
  }
  return std::make_unique<JsonRowFile>(f.path);
}

void for_each_row(const DataSource& src, const RowQuery& q, const std::function<bool(JsonRow&&)>& fn,
                  const RowFileOpener& opener) {
  const auto specs = parse_split(q.split, q.split_key);
  if (src.single_file && specs.size() > 1)
    throw DataError(q.split_key + ": '" + q.split + "' joins splits, but " + src.describe() +
                    " is one file, which is one split: point the dataset at a folder or hub dataset that has them");
  int64_t yielded = 0;
  auto open = [&](const DataFile& f) {
    std::unique_ptr<RowFile> r;
    if (opener) r = opener(f);
    return r ? std::move(r) : open_row_file(f);
  };
  for (const auto& s : specs) {
    const auto* files = src.files_of(s.split);
    if (!files)
      throw DataError(q.split_key + ": " + src.describe() + " has no split '" + s.split + "' (its splits: " +
                      join(src.split_names()) + ")");
    int64_t from = s.from.value_or(0), to = s.to.value_or(-1);  // to < 0: to the end
    if (split_needs_count(s)) {
      int64_t n = 0;
      for (const auto& f : *files) n += open(f)->num_rows();
      std::tie(from, to) = split_bounds(s, n);
    }
    int64_t g = 0;  // the split's row index of the current file's first row
    for (const auto& f : *files) {
      if (to >= 0 && g >= to) break;
      if (q.limit > 0 && yielded >= q.limit) return;
      const auto r = open(f);  // one file open at a time (a SQuAD JSON file is held whole while it is read)
      bool stop = false;
      const int64_t total = r->read(std::max<int64_t>(0, from - g), to < 0 ? -1 : to - g, [&](JsonRow&& row) {
        ++yielded;
        if (!fn(std::move(row)) || (q.limit > 0 && yielded >= q.limit)) {
          stop = true;
          return false;
        }
        return true;
      });
      if (stop) return;
      if (total < 0) break;  // reached `to` inside this file
      g += total;
    }
  }
}

}  // namespace am
