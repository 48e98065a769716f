// `pretrained_model_name_or_path` -> a local folder. A hub id ("org/name") is looked up in the local
// huggingface_hub cache, whose layout is
//   <cache>/models--org--name/refs/main               (text: the commit hash)
//   <cache>/models--org--name/snapshots/<hash>/...    (the files)
// Nothing is ever downloaded.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/model_config.h"

namespace am::io {

namespace fs = std::filesystem;

namespace {

std::string env(const char* k) {
  const char* v = std::getenv(k);
  return v ? std::string(v) : std::string();
}

std::string expand_home(const std::string& p) {
  if (p == "~" || p.rfind("~/", 0) == 0) {
    std::string home = env("HOME");
    if (!home.empty()) return home + p.substr(1);
  }
  return p;
}

// Hub ids are "name" or "org/name" with letters, digits, '-', '_' and '.', no "--" or ".." (huggingface_hub's
// validate_repo_id).
bool valid_repo_id(const std::string& id) {
  if (id.empty() || id.size() > 96 || id.find("--") != std::string::npos || id.find("..") != std::string::npos)
    return false;
  int slashes = 0;
  for (char ch : id) {
    if (ch == '/') {
      ++slashes;
      continue;
    }
    bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
              ch == '_' || ch == '.';
    if (!ok) return false;
  }
  return slashes <= 1 && id.front() != '/' && id.back() != '/' && id.front() != '-' && id.front() != '.';
}

// Cache roots in huggingface_hub's order of precedence ($HF_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/
// huggingface/hub, ~/.cache/huggingface/hub); all are searched, the first hit wins.
std::vector<std::string> cache_roots() {
  std::vector<std::string> roots;
  auto add = [&](const std::string& r) {
    if (r.empty()) return;
    std::string e = expand_home(r);
    for (const auto& x : roots)
      if (x == e) return;
    roots.push_back(e);
  };
  add(env("HF_HUB_CACHE"));
  if (!env("HF_HOME").empty()) add(expand_home(env("HF_HOME")) + "/hub");
  if (!env("XDG_CACHE_HOME").empty()) add(expand_home(env("XDG_CACHE_HOME")) + "/huggingface/hub");
  if (!env("HOME").empty()) add(env("HOME") + "/.cache/huggingface/hub");
  return roots;
}

// The snapshot refs/main names, else the most recently modified one; "" when there is none.
std::string pick_snapshot(const fs::path& repo, std::string* note) {
  std::error_code ec;
  const fs::path snaps = repo / "snapshots";
  std::ifstream ref(repo / "refs" / "main");
  if (ref) {
    std::string hash;
    std::getline(ref, hash);
    while (!hash.empty() && (hash.back() == '\r' || hash.back() == ' ')) hash.pop_back();
    if (!hash.empty() && hash.find('/') == std::string::npos && fs::is_directory(snaps / hash, ec))
      return (snaps / hash).string();
    *note = " (refs/main names " + hash + ", which is not in snapshots/)";
  }
  std::string best;
  fs::file_time_type best_t{};
  for (const auto& e : fs::directory_iterator(snaps, ec)) {
    if (!e.is_directory(ec)) continue;
    auto t = e.last_write_time(ec);
    if (best.empty() || t > best_t) {
      best = e.path().string();
      best_t = t;
    }
  }
  return best;
}

}  // namespace

std::string resolve_model_path(const std::string& name_or_path) {
  std::error_code ec;
  const std::string p = expand_home(name_or_path);
  if (fs::is_directory(p, ec)) return p;
  if (fs::exists(p, ec))
    throw IoError(name_or_path + ": is a file; pretrained_model_name_or_path must be a model folder or a hub id");
  if (!valid_repo_id(name_or_path))
    throw IoError(name_or_path + ": no such folder (and not a hub id of the form org/name)");

  std::string folder = "models--" + name_or_path;
  for (size_t i = folder.find('/'); i != std::string::npos; i = folder.find('/', i)) folder.replace(i, 1, "--");
  std::string tried = "folder ./" + name_or_path;
  std::string note;
  for (const std::string& root : cache_roots()) {
    const fs::path repo = fs::path(root) / folder;
    tried += ", " + repo.string();
    if (!fs::is_directory(repo, ec)) continue;
    std::string snap = pick_snapshot(repo, &note);
    if (!snap.empty()) return snap;
    tried += " (no snapshot)";
  }
  throw IoError(name_or_path + ": model not found locally" + note + "; tried " + tried +
                ". Downloads are never made: put the model in the HF cache (e.g. `huggingface-cli download " +
                name_or_path + "`) or pass a folder");
}

}  // namespace am::io
