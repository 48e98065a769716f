// safetensors writer: one file (header + data, written to a temporary name, fsynced, renamed) and a
// sharded folder laid out as transformers' save_pretrained lays it out:
//   model.safetensors                                  (everything fits in one shard)
//   model-00001-of-0000N.safetensors ... + model.safetensors.index.json
// with {"metadata": {"total_parameters": N, "total_size": BYTES}, "weight_map": {name: shard}} (indent 2,
// sorted keys, ASCII, trailing newline). The shard split is huggingface_hub's, so the same tensors in the same
// order land in the same files as with save_pretrained(max_shard_size=...).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/fd.h"
#include "io/safetensors.h"

namespace am::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Writes `path` through a temporary file in the same folder; the rename makes it appear complete or not
// at all. The temporary is removed if anything fails.
class AtomicFile {
 public:
  // The temporary's errors name it (".tmp.<pid>" beside the target), so a full disk points at the right file.
  explicit AtomicFile(const std::string& path)
      : path_(path), tmp_(path + ".tmp." + std::to_string(::getpid())), fd_(tmp_, O_WRONLY | O_CREAT | O_TRUNC) {}
  ~AtomicFile() {
    if (!done_) ::unlink(tmp_.c_str());
  }
  void write(const void* data, size_t n) { fd_.write_all(data, n); }
  void commit() {
    fd_.sync_close();
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0)
      throw IoError(path_ + ": rename from " + tmp_ + " failed: " + std::strerror(errno));
    done_ = true;
  }

 private:
  std::string path_, tmp_;
  Fd fd_;
  bool done_ = false;
};

void check_tensor(const std::string& file, const std::string& name, const Tensor& t) {
  if (name.empty() || name == "__metadata__")
    throw FormatError(file + ": invalid tensor name '" + name + "'");
  if (!t.defined()) throw IoError(file + ": tensor '" + name + "' is undefined");
  if (t.device() != DeviceType::CPU)
    throw IoError(file + ": tensor '" + name + "' is not on the host; copy it to the CPU before saving");
}

}  // namespace

void save_safetensors_file(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                           const std::map<std::string, std::string>& metadata) {
  // Data order: widest dtype first, then by name (as the reference writer does), so every tensor starts at
  // a multiple of its element size given the 8-aligned data start. The JSON header itself has sorted keys.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    check_tensor(path, name, t);
    if (!seen.insert(name).second) throw FormatError(path + ": tensor '" + name + "' given twice");
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    size_t sa = dtype_size(tensors[a].second.dtype()), sb = dtype_size(tensors[b].second.dtype());
    return sa != sb ? sa > sb : tensors[a].first < tensors[b].first;
  });

  json h = json::object();  // std::map-backed: keys serialise sorted
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (size_t i : order) {
    const auto& [name, t] = tensors[i];
    json e;
    e["dtype"] = dtype_safetensors_name(t.dtype());
    e["shape"] = t.shape();
    e["data_offsets"] = {off, off + t.nbytes()};
    h[name] = std::move(e);
    off += t.nbytes();
  }
  std::string hs;
  try {
    hs = h.dump();  // compact, as the reference writer's serde_json::to_string
  } catch (const json::exception& e) {  // a name or metadata value that is not valid UTF-8
    throw FormatError(path + ": cannot write the header: " + e.what());
  }
  hs.append((8 - hs.size() % 8) % 8, ' ');  // the data must start 8-byte aligned
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(static_cast<uint64_t>(hs.size()) >> (8 * i));

  std::error_code ec;
  fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent, ec);
  AtomicFile f(path);
  f.write(len, 8);
  f.write(hs.data(), hs.size());
  for (size_t i : order) f.write(tensors[i].second.raw(), tensors[i].second.nbytes());
  f.commit();
}

void save_safetensors_dir(const std::string& dir, const std::vector<std::pair<std::string, Tensor>>& tensors,
                          const SaveOptions& opt, const std::string& basename) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir, ec)) throw IoError(dir + ": cannot create folder");
  for (const auto& [name, t] : tensors) check_tensor(dir, name, t);

  // Shard split as huggingface_hub's split_state_dict_into_shards: in the given order, a tensor larger than
  // the limit gets a shard of its own; otherwise a new shard starts when the current one would overflow.
  std::vector<std::vector<size_t>> shards;
  std::vector<size_t> cur;
  size_t cur_bytes = 0, total = 0;
  int64_t total_params = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    size_t b = tensors[i].second.nbytes();
    total += b;
    total_params += tensors[i].second.numel();
    if (b > opt.max_shard_bytes) {
      shards.push_back({i});
      continue;
    }
    if (cur_bytes + b > opt.max_shard_bytes) {
      shards.push_back(std::move(cur));
      cur.clear();
      cur_bytes = 0;
    }
    cur.push_back(i);
    cur_bytes += b;
  }
  if (!cur.empty() || shards.empty()) shards.push_back(std::move(cur));

  const fs::path d(dir);
  const std::string index_name = basename + ".safetensors.index.json";
  std::set<std::string> written;
  if (shards.size() == 1) {
    save_safetensors_file((d / (basename + ".safetensors")).string(), tensors, opt.metadata);
    written.insert(basename + ".safetensors");
  } else {
    json wm = json::object();
    const size_t n = shards.size();
    auto pad5 = [](size_t v) {
      std::string s = std::to_string(v);
      return std::string(s.size() < 5 ? 5 - s.size() : 0, '0') + s;
    };
    for (size_t k = 0; k < n; ++k) {
      std::string fn = basename + "-" + pad5(k + 1) + "-of-" + pad5(n) + ".safetensors";
      std::vector<std::pair<std::string, Tensor>> part;
      for (size_t i : shards[k]) {
        part.push_back(tensors[i]);
        wm[tensors[i].first] = fn;
      }
      save_safetensors_file((d / fn).string(), part, opt.metadata);
      written.insert(fn);
    }
    // As transformers' save_pretrained: total_parameters (elements) and total_size (bytes) in the metadata,
    // dumped with json.dumps(index, indent=2, sort_keys=True) + "\n".
    json index = {{"metadata", {{"total_parameters", total_params}, {"total_size", total}}}, {"weight_map", wm}};
    std::string text;
    try {
      text = index.dump(2, ' ', /*ensure_ascii=*/true) + "\n";
    } catch (const json::exception& e) {
      throw FormatError((d / index_name).string() + ": cannot write the index: " + e.what());
    }
    AtomicFile f((d / index_name).string());
    f.write(text.data(), text.size());
    f.commit();
    written.insert(index_name);
  }

  // Remove what a previous save with a different split left behind, as save_pretrained does: a stale index
  // or shard would otherwise be read back instead of (or together with) the new files.
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(d, ec)) {
    std::string fn = e.path().filename().string();
    if (written.count(fn)) continue;
    bool ours = fn == basename + ".safetensors" || fn == index_name ||
                (fn.rfind(basename + "-", 0) == 0 && fn.find("-of-") != std::string::npos &&
                 fn.size() > 12 && fn.compare(fn.size() - 12, 12, ".safetensors") == 0);
    if (ours) stale.push_back(e.path());
  }
  for (const auto& p : stale) fs::remove(p, ec);
}

}  // namespace am::io
